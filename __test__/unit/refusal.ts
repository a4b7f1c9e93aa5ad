/** The assertion of the unit tests for an argument refused before anything runs. */
import type { ExecutionContext } from 'ava'
import { KvTransferError } from '../../ts/errors'

/**
 * Asserts that `run` throws `ERR_INVALID_ARGUMENT` for argument `name` (the message starts
 * `invalid <name>: `) and that the message contains every one of `mentions` (the value, the
 * limit).
 */
export function assertRefused(t: ExecutionContext, run: () => unknown, name: string, ...mentions: string[]): void {
  const error = t.throws(run, { instanceOf: KvTransferError })
  if (!error) return
  t.is(error.code, 'ERR_INVALID_ARGUMENT', error.message)
  t.true(error.message.startsWith(`invalid ${name}: `), `${JSON.stringify(error.message)} should name ${name}`)
  for (const mention of mentions) {
    t.true(
      error.message.includes(mention),
      `${JSON.stringify(error.message)} should mention ${JSON.stringify(mention)}`,
    )
  }
}
