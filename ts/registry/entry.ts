/**
 * What a communicator publishes in the registry (an {@link Instance}), its JSON form, and
 * the address peers reach its control plane at.
 */
import { randomUUID } from 'node:crypto'
import * as os from 'node:os'
import { invalidArgument, showValue } from '../errors'
import { type Role, type Settings, checkNonNegativeInteger, checkType, toOptions } from '../options'

/** The cache layout an instance declares (peers must match it to connect). */
export interface InstanceLayout {
  layers: number
  blockNumber: number
  blockBytes: number
  /** 0: no scale regions. */
  scaleBlockBytes: number
  /** No value regions (e.g. MLA). */
  keyOnly: boolean
}

/** A live communicator as the registry lists it (`comm.instances()`, `kvtransfer instances`). */
export interface Instance {
  /** Its `name` option (default `hostname:port`): unique in the registry. */
  name: string
  role: Role
  tpSize: number
  tpRank: number
  layout: InstanceLayout
  /** The transport this side prefers (`'nvlink'`, `'rdma'` or `'tcp'`; `auto` falls back from it). */
  transport: string
  /**
   * Every transport this side opened, most preferred first, with what it uses here (e.g.
   * `{ transport: 'rdma', summary: 'rdma on mlx5_0 port 1, GID index 3 …' }`).
   */
  transports: { transport: string; summary: string }[]
  /** Where its control plane listens: what `connect(name)` connects to. */
  control: { host: string; port: number }
  /** The host and process it runs in. */
  hostname: string
  pid: number
  /** When it registered (ISO 8601). */
  startedAt: string
  /** Random per communicator: tells a re-registration from another holder of the name. */
  id: string
}

/** An instance whose registry entry is gone (`'instance-left'`). */
export interface InstanceLeft {
  name: string
  /** Its last entry this side saw. */
  instance: Instance
}

/** Filters of `comm.instances()` and `kvtransfer instances`; absent fields match all. */
export interface InstanceFilter {
  role?: Role
  tpRank?: number
  transport?: string
  hostname?: string
}

/** The entry's text in etcd. */
export function encodeInstance(instance: Instance): string {
  return JSON.stringify(instance)
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0
const isText = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && v.length <= 1024

/**
 * An entry read from etcd under `name`'s key; undefined when it is not one this version
 * wrote (another tool's key under the prefix, or a malformed value): never trusted as is.
 */
export function decodeInstance(name: string, text: string): Instance | undefined {
  let value: Partial<Instance>
  try {
    value = JSON.parse(text) as Partial<Instance>
  } catch {
    return undefined
  }
  if (typeof value !== 'object' || value === null || value.name !== name) return undefined
  const layout = value.layout as Partial<InstanceLayout> | undefined
  const control = value.control as Partial<Instance['control']> | undefined
  const valid =
    (value.role === 'prefill' || value.role === 'decode') &&
    isInt(value.tpSize) &&
    isInt(value.tpRank) &&
    typeof layout === 'object' &&
    layout !== null &&
    isInt(layout.layers) &&
    isInt(layout.blockNumber) &&
    isInt(layout.blockBytes) &&
    isInt(layout.scaleBlockBytes) &&
    typeof layout.keyOnly === 'boolean' &&
    isText(value.transport) &&
    Array.isArray(value.transports) &&
    value.transports.every(
      (o) => typeof o === 'object' && o !== null && isText(o.transport) && typeof o.summary === 'string',
    ) &&
    typeof control === 'object' &&
    control !== null &&
    isText(control.host) &&
    isInt(control.port) &&
    control.port > 0 &&
    control.port <= 65535 &&
    isText(value.hostname) &&
    isInt(value.pid) &&
    isText(value.startedAt) &&
    isText(value.id)
  return valid ? (value as Instance) : undefined
}

/** A filter as given to `instances()`, checked: `ERR_INVALID_ARGUMENT` naming the field. */
export function toInstanceFilter(given: unknown): InstanceFilter {
  const filter = toOptions('filter', given as InstanceFilter | undefined)
  const { role, tpRank, transport, hostname } = filter
  if (role !== undefined && role !== 'prefill' && role !== 'decode')
    throw invalidArgument('filter.role', `${showValue(role)} is not 'prefill' or 'decode'`)
  if (tpRank !== undefined) checkNonNegativeInteger('filter.tpRank', tpRank, 0xffff_ffff)
  if (transport !== undefined) checkType('filter.transport', transport, 'string')
  if (hostname !== undefined) checkType('filter.hostname', hostname, 'string')
  return filter
}

/** Whether `instance` passes `filter`. */
export function matches(instance: Instance, filter: InstanceFilter): boolean {
  return (
    (filter.role === undefined || instance.role === filter.role) &&
    (filter.tpRank === undefined || instance.tpRank === filter.tpRank) &&
    (filter.transport === undefined || instance.transport === filter.transport) &&
    (filter.hostname === undefined || instance.hostname === filter.hostname)
  )
}

const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/

/**
 * The address peers reach a control plane bound to `host` at: `host` itself when it is an
 * IPv4 address other than 0.0.0.0; an interface name's IPv4 address; else (all
 * interfaces) the first non-loopback IPv4 address of this host, or 127.0.0.1 without one.
 */
export function advertisedHost(host: string): string {
  if (IPV4.test(host) && host !== '0.0.0.0') return host
  const interfaces = os.networkInterfaces()
  const ipv4 = (list: os.NetworkInterfaceInfo[] | undefined) => list?.find((a) => a.family === 'IPv4')?.address
  if (host !== '*' && host !== '0.0.0.0') {
    const named = ipv4(interfaces[host])
    if (named) return named
  }
  for (const list of Object.values(interfaces)) {
    const external = list?.find((a) => a.family === 'IPv4' && !a.internal)
    if (external) return external.address
  }
  return '127.0.0.1'
}

/**
 * The entry a communicator publishes: its settings, `name`, the transports it opened (most
 * preferred first), and the control address peers reach (`port` as bound).
 */
export function instanceOf(
  settings: Settings,
  name: string,
  transports: Instance['transports'],
  port: number,
): Instance {
  const { role, tpSize = 1, tpRank = 0, scaleBlockBytes = 0 } = settings.native
  return {
    name,
    role: role as Role,
    tpSize,
    tpRank,
    layout: {
      layers: settings.native.localKeyCache.length,
      blockNumber: settings.blockNumber,
      blockBytes: settings.blockBytes,
      scaleBlockBytes,
      keyOnly: settings.native.localValueCache.length === 0,
    },
    transport: transports[0]?.transport ?? 'none',
    transports,
    control: { host: advertisedHost(settings.host), port },
    hostname: os.hostname(),
    pid: process.pid,
    startedAt: new Date().toISOString(),
    id: randomUUID(),
  }
}
