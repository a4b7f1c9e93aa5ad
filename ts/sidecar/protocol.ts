/**
 * The sidecar protocol's messages (docs/sidecar.md): requests as JSON objects, their
 * fields checked and turned into the TS API's arguments. Descriptor indices refer to the
 * connection's received descriptors.
 */
import { KvTransferError, invalidArgument } from '../errors'
import type { FenceTarget } from '../fences'
import type { CommunicatorOptions, FenceOptions, SharedRegion } from '../options'
import type { RequestTag } from '../tags'

/** The protocol version this sidecar speaks. */
export const SIDECAR_PROTOCOL = 1

/** A request as it arrived: `op` and its fields. */
export type Request = Record<string, unknown> & { op: string }

/** The JSON object of a frame's body, or a typed error. */
export function parseRequest(body: Buffer): Request {
  let value: unknown
  try {
    value = JSON.parse(body.toString('utf8'))
  } catch (error) {
    throw new KvTransferError('ERR_PROTOCOL', `a request is not JSON (${(error as Error).message})`)
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value) || typeof (value as Request).op !== 'string')
    throw new KvTransferError('ERR_PROTOCOL', 'a request must be a JSON object with a string "op"')
  return value as Request
}

/** Field `name` of `request`, which must be a string. */
export function stringField(request: Request, name: string): string {
  const value = request[name]
  if (typeof value !== 'string') throw invalidArgument(name, `expected a string, got ${describe(value)}`)
  return value
}

/** Field `name`, a whole number ≥ 0 (absent: `fallback`, or an error when none). */
export function numberField(request: Request, name: string, fallback?: number): number {
  const value = request[name]
  if (value === undefined && fallback !== undefined) return fallback
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0)
    throw invalidArgument(name, `expected a whole number ≥ 0, got ${describe(value)}`)
  return value
}

/** Field `name`, a list of whole numbers (block ids, descriptor indices). */
export function idsField(request: Request, name: string): number[] {
  const value = request[name]
  if (!Array.isArray(value)) throw invalidArgument(name, `expected a list of block ids, got ${describe(value)}`)
  return value as number[]
}

function describe(value: unknown): string {
  if (value === undefined) return 'nothing'
  if (value === null) return 'null'
  return typeof value === 'string' ? JSON.stringify(value) : typeof value
}

/** `{"s": text}` or `{"u": "decimal u64"}` as a TS tag; absent: none. */
export function tagField(request: Request, name = 'tag'): RequestTag | undefined {
  const value = request[name] as Record<string, unknown> | undefined
  if (value === undefined || value === null) return undefined
  if (typeof value === 'object' && typeof value.s === 'string') return value.s
  if (typeof value === 'object' && typeof value.u === 'string' && /^\d{1,20}$/.test(value.u)) return BigInt(value.u)
  throw invalidArgument(name, 'expected {"s": text} or {"u": "decimal u64"}')
}

/** A TS tag in the protocol's form. */
export function tagJson(tag: RequestTag): { s: string } | { u: string } {
  return typeof tag === 'bigint' ? { u: tag.toString() } : { s: tag }
}

/**
 * The target and options of a `fence` request as `RDMACommunicator.fence` takes them:
 * `tag` (a tag in the protocol's form) or `peer` (a writer's name), `holdMs`?,
 * `ackTimeoutMs`?. `fence` itself checks them (exactly one of tag and peer, the ranges).
 */
export function fenceArguments(request: Request): { target: FenceTarget; options: FenceOptions } {
  const tag = tagField(request)
  const target: Record<string, unknown> = {}
  if (tag !== undefined) target.tag = tag
  if (request.peer !== undefined && request.peer !== null) target.peer = request.peer
  return {
    target: target as FenceTarget,
    options: {
      holdMs: request.holdMs as number | undefined,
      ackTimeoutMs: request.ackTimeoutMs as number | undefined,
    },
  }
}

/** The region lists of an `attach` with descriptor indices resolved to `fds`. */
function regionsField(request: Request, name: string, fds: readonly number[], optional: boolean): SharedRegion[] {
  const list = request[name]
  if (list === undefined && optional) return []
  if (!Array.isArray(list))
    throw invalidArgument(name, `expected a list of regions (one per layer), got ${describe(list)}`)
  return list.map((item: unknown, index) => sharedRegion(`${name}[${index}]`, item, fds))
}

function descriptor(name: string, index: unknown, fds: readonly number[]): number {
  if (typeof index !== 'number' || !Number.isInteger(index) || index < 0 || index >= fds.length)
    throw invalidArgument(
      name,
      `descriptor index ${JSON.stringify(index)} is not one of the ${fds.length} descriptors received on this connection (0..${fds.length - 1})`,
    )
  return fds[index]
}

function sharedRegion(name: string, item: unknown, fds: readonly number[]): SharedRegion {
  if (typeof item !== 'object' || item === null)
    throw invalidArgument(name, `expected a region object, got ${describe(item)}`)
  const region = item as Record<string, unknown>
  const extent = { offset: region.offset as number, bytes: region.bytes as number }
  if (region.fd !== undefined) return { ...extent, fd: descriptor(name, region.fd, fds) }
  if (region.cudaIpcHandle !== undefined) {
    if (typeof region.cudaIpcHandle !== 'string' || !/^([0-9a-fA-F]{2})+$/.test(region.cudaIpcHandle))
      throw invalidArgument(name, 'cudaIpcHandle must be the handle as hexadecimal text')
    return { ...extent, cudaIpcHandle: new Uint8Array(Buffer.from(region.cudaIpcHandle, 'hex')) }
  }
  if (region.cudaVmmFds !== undefined) {
    if (!Array.isArray(region.cudaVmmFds))
      throw invalidArgument(name, 'cudaVmmFds must be a list of descriptor indices')
    return {
      ...extent,
      cudaVmmFds: region.cudaVmmFds.map((i: unknown) => descriptor(name, i, fds)),
      segmentBytes: region.segmentBytes as number,
    }
  }
  throw invalidArgument(name, 'a region needs one of fd, cudaIpcHandle, cudaVmmFds')
}

/** The communicator options of an `attach` request. */
export function attachOptions(request: Request, fds: readonly number[]): CommunicatorOptions {
  const optional = <T>(name: string): T | undefined => (request[name] === undefined ? undefined : (request[name] as T))
  return {
    role: request.role as CommunicatorOptions['role'],
    gpuIdx: numberField(request, 'gpuIdx', 0),
    port: numberField(request, 'port', 0),
    name: optional<string>('name'),
    host: optional<string>('host'),
    blockNumber: request.blockNumber as number,
    blockBytes: request.blockBytes as number,
    scaleBlockBytes: optional<number>('scaleBlockBytes'),
    tpSize: optional<number>('tpSize'),
    tpRank: optional<number>('tpRank'),
    kvReplicated: optional<boolean>('kvReplicated'),
    transport: optional<CommunicatorOptions['transport']>('transport'),
    rdmaDevices: optional<string[]>('rdmaDevices'),
    authToken: optional<string>('authToken'),
    writeTimeoutMs: optional<number>('writeTimeoutMs'),
    localKeyCache: regionsField(request, 'keyCache', fds, false),
    localValueCache: regionsField(request, 'valueCache', fds, true),
    keyScaleCache: regionsField(request, 'keyScaleCache', fds, true),
    valueScaleCache: regionsField(request, 'valueScaleCache', fds, true),
  }
}
