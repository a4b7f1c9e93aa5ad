/**
 * The etcd client (`etcd3`, over `@grpc/grpc-js`) as the registry uses it: every unary call
 * bounded, failover across the members, a short watch back-off; and the one way its
 * failures become typed errors.
 */
import { ConsecutiveBreaker, ExponentialBackoff, type IBackoff, circuitBreaker, handleAll, retry } from 'cockatiel'
import { Etcd3 } from 'etcd3'
import { KvTransferError } from '../errors'
import type { RegistryAddress } from '../options'

/** Bound of one unary etcd call (ms): an unreachable member fails within it. */
export const CALL_TIMEOUT_MS = 1500

/** A client of the registry's etcd cluster. */
export function etcdClient(address: RegistryAddress): Etcd3 {
  return new Etcd3({
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
      watchBackoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 1000 }) as unknown as IBackoff<unknown>,
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
