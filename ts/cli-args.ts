/** Argument helpers shared by the `kvtransfer` subcommands. */

/** A usage error: printed without a stack, exit status 2. */
export class UsageError extends Error {}

/** `--name`'s integer value (≥ `min`), or `fallback` when absent. */
export function integer(name: string, text: string | undefined, fallback: number, min = 1): number {
  if (text === undefined) return fallback
  const value = Number(text)
  if (!Number.isInteger(value) || value < min)
    throw new UsageError(`--${name} expects an integer ≥ ${min}, got '${text}'`)
  return value
}
