/**
 * The etcd client (`etcd3`, over `@grpc/grpc-js`) as the registry uses it: every unary call
 * bounded, failover across the members, a short watch back-off; and the one way its
 * failures become typed errors.
 */
import type * as Cockatiel from 'cockatiel'
import type { Etcd3 } from 'etcd3'
import type * as Etcd from 'etcd3'
import { KvTransferError } from '../errors'
import type { RegistryAddress } from '../options'

/** Bound of one unary etcd call (ms): an unreachable member fails within it. */
export const CALL_TIMEOUT_MS = 1500

/** A client of the registry's etcd cluster. */
export function etcdClient(address: RegistryAddress): Etcd3 {
  // Loaded on first use: a communicator without a registry never loads gRPC (startup time,
  // and what a bundle or a minimal install must carry).
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { ConsecutiveBreaker, ExponentialBackoff, circuitBreaker, handleAll, retry } =
    require('cockatiel') as typeof Cockatiel
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const etcd = require('etcd3') as typeof Etcd
  return new etcd.Etcd3({
    hosts: address.endpoints.map((endpoint) => `http://${endpoint}`),
    dialTimeout: CALL_TIMEOUT_MS,
    defaultCallOptions: (context) => (context.isStream ? {} : { deadline: new Date(Date.now() + CALL_TIMEOUT_MS) }),
    faultHandling: {
      // One try per member, then give up: the callers fall back or report unavailable.
      global: retry(handleAll, { maxAttempts: Math.max(1, address.endpoints.length - 1) }),
      // A member that failed twice is skipped for a second, then tried again.
      host: () => circuitBreaker(handleAll, { halfOpenAfter: 1000, breaker: new ConsecutiveBreaker(2) }),
      // etcd3 calls `next()` on what it is given (as on its own default, a factory); its
      // declared type is the older cockatiel's.
      watchBackoff: new ExponentialBackoff({
        initialDelay: 100,
        maxDelay: 1000,
      }) as unknown as Cockatiel.IBackoff<unknown>,
    },
  })
}

/** The key of instance `name` under the registry's prefix. */
export function instanceKey(address: RegistryAddress, name: string): string {
  return `${instancesPrefix(address)}${name}`
}

/** Where every instance's key starts. */
export function instancesPrefix(address: RegistryAddress): string {
  return `/${address.prefix}/instances/`
}

/** `ERR_REGISTRY_UNAVAILABLE` for `address`: `what` failed, with etcd's error as cause. */
export function unavailable(address: RegistryAddress, what: string, cause?: unknown): KvTransferError {
  const why = cause instanceof Error ? `: ${cause.message}` : ''
  return new KvTransferError('ERR_REGISTRY_UNAVAILABLE', `registry ${address.url} is unavailable (${what}${why})`, {
    cause,
  })
}
