/**
 * A manual clock for the unit tests: it stands in for the global `setTimeout` and
 * `clearTimeout` until the test ends, so a deadline fires exactly when the test advances
 * time, with no real waiting. The globals are shared by a file's tests: a test that uses
 * it must be `test.serial`.
 */
import type { ExecutionContext } from 'ava'

interface Timer {
  dueAt: number
  callback: () => void
}

export class FakeClock {
  private now = 0
  private nextId = 1
  private readonly timers = new Map<number, Timer>()

  /** Timers scheduled and neither fired nor cleared. */
  get pending(): number {
    return this.timers.size
  }

  /** The delays asked for, in milliseconds, of the pending timers. */
  get pendingDelays(): number[] {
    return [...this.timers.values()].map((timer) => timer.dueAt - this.now)
  }

  /** Moves time on by `milliseconds`, firing the timers due by then in order. */
  advance(milliseconds: number): void {
    const target = this.now + milliseconds
    for (;;) {
      const due = [...this.timers.entries()]
        .filter(([, timer]) => timer.dueAt <= target)
        .sort(([, a], [, b]) => a.dueAt - b.dueAt)[0]
      if (!due) break
      const [id, timer] = due
      this.timers.delete(id)
      this.now = timer.dueAt
      timer.callback()
    }
    this.now = target
  }

  setTimeout(callback: () => void, delay = 0): number {
    const id = this.nextId++
    this.timers.set(id, { dueAt: this.now + Math.max(0, delay), callback })
    return id
  }

  clearTimeout(id: unknown): void {
    if (typeof id === 'number') this.timers.delete(id)
  }
}

/** Installs a fake clock for the rest of test `t`; the real timers come back at its end. */
export function useFakeClock(t: ExecutionContext): FakeClock {
  const clock = new FakeClock()
  const realSetTimeout = globalThis.setTimeout
  const realClearTimeout = globalThis.clearTimeout
  globalThis.setTimeout = ((callback: () => void, delay?: number) =>
    clock.setTimeout(callback, delay)) as unknown as typeof globalThis.setTimeout
  globalThis.clearTimeout = ((id: unknown) => clock.clearTimeout(id)) as typeof globalThis.clearTimeout
  t.teardown(() => {
    globalThis.setTimeout = realSetTimeout
    globalThis.clearTimeout = realClearTimeout
  })
  return clock
}

/** Whether `promise` has settled once every queued reaction has run (it is not consumed). */
export async function stateOf(promise: Promise<unknown>): Promise<'pending' | 'resolved' | 'rejected'> {
  let state: 'pending' | 'resolved' | 'rejected' = 'pending'
  promise.then(
    () => (state = 'resolved'),
    () => (state = 'rejected'),
  )
  // setImmediate runs after the microtask queue is drained (and is not faked).
  await new Promise((resolve) => setImmediate(resolve))
  return state
}
