/**
 * Stable error codes of kvtransfer. Every error thrown or rejected by this package is a
 * {@link KvTransferError} whose `code` is one of these.
 */
export type KvTransferErrorCode =
  | 'ERR_BLOCK_ID_OUT_OF_RANGE'
  | 'ERR_INVALID_BLOCK_ID'
  | 'ERR_BLOCK_COUNT_MISMATCH'
  | 'ERR_LAYER_OUT_OF_RANGE'
  | 'ERR_LAYOUT_MISMATCH'
  | 'ERR_REGION_OVERFLOW'
  | 'ERR_INVALID_ARGUMENT'
  | 'ERR_NOT_CONNECTED'
  | 'ERR_CLOSED'
  | 'ERR_PROTOCOL'
  | 'ERR_IO'
  | 'ERR_PEER_DISCONNECTED'
  | 'ERR_RDMA_UNAVAILABLE'
  | 'ERR_RDMA'
  | 'ERR_RDMA_COMPLETION'
  | 'ERR_CUDA'
  | 'ERR_TIMEOUT'
  | 'ERR_ABORTED'
  | 'ERR_AUTH'
  | 'ERR_CONNECT_REFUSED'

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

const NATIVE_MESSAGE = /^\[(ERR_[A-Z_]+)\] ([\s\S]*)$/

/** Lifts an error thrown by the native addon (message `[CODE] text`) into a KvTransferError. */
export function fromNative(error: unknown): KvTransferError {
  if (error instanceof KvTransferError) return error
  const message = error instanceof Error ? error.message : String(error)
  const match = NATIVE_MESSAGE.exec(message)
  if (match) return new KvTransferError(match[1] as KvTransferErrorCode, match[2])
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

/** Builds the `ERR_INVALID_ARGUMENT` error for argument `name`: `invalid <name>: <reason>`. */
export function invalidArgument(name: string, reason: string): KvTransferError {
  return new KvTransferError('ERR_INVALID_ARGUMENT', `invalid ${name}: ${reason}`)
}
