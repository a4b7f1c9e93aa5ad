/**
 * Stable error codes of kvtransfer: exactly the engine's list (`ERROR_CODES` in
 * crates/engine/src/error.rs, exported by the addon as `errorCodes()`; a test checks that
 * the two are equal).
 */
export const KV_TRANSFER_ERROR_CODES = [
  'ERR_BLOCK_ID_OUT_OF_RANGE',
  'ERR_INVALID_BLOCK_ID',
  'ERR_BLOCK_COUNT_MISMATCH',
  'ERR_LAYER_OUT_OF_RANGE',
  'ERR_LAYOUT_MISMATCH',
  'ERR_REGION_OVERFLOW',
  'ERR_INVALID_ARGUMENT',
  'ERR_NOT_CONNECTED',
  'ERR_CLOSED',
  'ERR_PROTOCOL',
  'ERR_IO',
  'ERR_PEER_DISCONNECTED',
  'ERR_RDMA_UNAVAILABLE',
  'ERR_TRANSPORT_UNAVAILABLE',
  'ERR_RDMA',
  'ERR_RDMA_COMPLETION',
  'ERR_CUDA',
  'ERR_TIMEOUT',
  'ERR_ABORTED',
  'ERR_FENCED',
  'ERR_AUTH',
  'ERR_TP_MISMATCH',
  'ERR_UNSUPPORTED',
  'ERR_CHECKSUM_MISMATCH',
  'ERR_REGISTRY_UNAVAILABLE',
  'ERR_NAME_TAKEN',
  'ERR_INTERNAL',
] as const

/**
 * Stable error codes of kvtransfer. Every error thrown or rejected by this package is a
 * {@link KvTransferError} whose `code` is one of these.
 */
export type KvTransferErrorCode = (typeof KV_TRANSFER_ERROR_CODES)[number]

const KNOWN_CODES: ReadonlySet<string> = new Set(KV_TRANSFER_ERROR_CODES)

/** An error from kvtransfer: `code` is stable, `message` names the value and the limit. */
export class KvTransferError extends Error {
  /** Stable machine-readable code. */
  readonly code: KvTransferErrorCode

  /**
   * @param code - the stable code
   * @param message - what was wrong: the value and the limit
   * @param options - `cause`: the underlying error, if any
   */
  constructor(code: KvTransferErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'KvTransferError'
    this.code = code
  }
}

/**
 * Lifts an error thrown or reported by the native addon into a KvTransferError: the addon
 * sets `code` (one of {@link KV_TRANSFER_ERROR_CODES}) and `message`. Anything else (a
 * failure of napi itself, e.g. an argument of the wrong type) becomes `ERR_IO` with the
 * original error as `cause`.
 */
export function fromNative(error: unknown): KvTransferError {
  if (error instanceof KvTransferError) return error
  const code = (error as { code?: unknown } | null | undefined)?.code
  const message = error instanceof Error ? error.message : String(error)
  if (typeof code === 'string' && KNOWN_CODES.has(code))
    return new KvTransferError(code as KvTransferErrorCode, message)
  return new KvTransferError('ERR_IO', message, { cause: error })
}

/** Runs `fn`, converting anything it throws with {@link fromNative}. */
export function native<T>(fn: () => T): T {
  try {
    return fn()
  } catch (error) {
    throw fromNative(error)
  }
}

/** Awaits `promise`, converting a rejection with {@link fromNative}. */
export async function nativeAsync<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise
  } catch (error) {
    throw fromNative(error)
  }
}

/**
 * A value as refusals name it: its type, then the value itself where it has a short text
 * form (`number -5`, `string "abc"`, `bigint 3n`, `boolean true`, `null`, `object`,
 * `object (Float64Array)`).
 */
export function describeValue(value: unknown): string {
  switch (typeof value) {
    case 'string':
      return `string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`
    case 'number':
    case 'boolean':
      return `${typeof value} ${String(value)}`
    case 'bigint':
      return `bigint ${value}n`
    case 'object': {
      if (value === null) return 'null'
      if (Array.isArray(value)) return 'array'
      const kind = (value as { constructor?: { name?: unknown } }).constructor?.name
      return typeof kind === 'string' && kind !== 'Object' ? `object (${kind})` : 'object'
    }
    default:
      return typeof value
  }
}

/**
 * A value as "<value> is not ..." refusals name it: a string in quotes (`"1"` is not `1`),
 * a bigint with its `n`, an object by its type, anything else as `String` writes it.
 */
export function showValue(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)
  if (typeof value === 'bigint') return `${value}n`
  if (typeof value === 'object' && value !== null) return describeValue(value)
  return String(value)
}

/** Builds the `ERR_INVALID_ARGUMENT` error for argument `name`: `invalid <name>: <reason>`. */
export function invalidArgument(name: string, reason: string): KvTransferError {
  return new KvTransferError('ERR_INVALID_ARGUMENT', `invalid ${name}: ${reason}`)
}

/** `ERR_ABORTED`: `<what> was aborted`. */
export function abortError(what: string): KvTransferError {
  return new KvTransferError('ERR_ABORTED', `${what} was aborted`)
}
