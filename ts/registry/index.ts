/**
 * The instance registry on etcd (README "Running a fleet"): a communicator's membership
 * (its entry published under a lease, the live view of the others, names resolved to
 * control addresses), and the read-only uses of the CLI (`kvtransfer instances`) and the
 * doctor.
 */
import type { Etcd3 } from 'etcd3'
import { type DeadlineOptions, withDeadline } from '../deadline'
import { KvTransferError, abortError, invalidArgument } from '../errors'
import { REGISTRY_FORM, type RegistryAddress, toRegistry } from '../options'
import { etcdClient, instanceKey, instancesPrefix, unavailable } from './client'
import {
  type Instance,
  type InstanceFilter,
  type InstanceLeft,
  decodeInstance,
  matches,
  toInstanceFilter,
} from './entry'
import { Publisher } from './publisher'
import { InstanceView } from './watcher'

export type { Instance, InstanceFilter, InstanceLayout, InstanceLeft } from './entry'
export { advertisedHost, toInstanceFilter } from './entry'

/** What a communicator hears from its membership. */
export interface MembershipHooks {
  joined(instance: Instance): void
  left(left: InstanceLeft): void
}

/** One communicator's place in the registry. */
export class Membership {
  private readonly client: Etcd3
  private readonly view: InstanceView
  private publisher: Publisher | undefined

  constructor(
    readonly address: RegistryAddress,
    private readonly ttlSeconds: number,
    hooks: MembershipHooks,
  ) {
    this.client = etcdClient(address)
    this.view = new InstanceView(this.client, address)
    this.view.on('joined', (instance) => hooks.joined(instance))
    this.view.on('left', (left) => hooks.left(left))
  }

  /**
   * Starts watching the registry, then publishes `entry`. Rejects `ERR_NAME_TAKEN` or
   * `ERR_REGISTRY_UNAVAILABLE` (then nothing stays published).
   */
  async join(entry: Instance): Promise<void> {
    await this.view.start()
    this.publisher = new Publisher(
      this.client,
      this.address,
      instanceKey(this.address, entry.name),
      entry,
      this.ttlSeconds,
    )
    await this.publisher.start()
  }

  /**
   * The live instance named `name`: read from etcd, waiting (within the deadline) for one
   * that has not joined yet. During an etcd outage, the last entry this side saw of it;
   * `ERR_REGISTRY_UNAVAILABLE` when it saw none.
   */
  async resolve(name: string, deadline: DeadlineOptions): Promise<Instance> {
    let text: string | null
    try {
      text = await this.client.get(instanceKey(this.address, name)).string()
    } catch (error) {
      const known = this.view.instances.get(name)
      if (known) return known
      throw unavailable(this.address, `looking up ${JSON.stringify(name)}, never seen before the outage`, error)
    }
    const instance = text === null ? undefined : decodeInstance(name, text)
    if (instance) return instance
    const { seen, cancel } = this.view.appearance(name)
    const what = `connect to ${JSON.stringify(name)}`
    return withDeadline(seen, deadline, {
      timeout: () =>
        new KvTransferError(
          'ERR_TIMEOUT',
          `timed out after ${deadline.timeoutMs} ms: ${what}: no instance of that name is in registry ${this.address.url}`,
        ),
      abort: () => abortError(what),
      abandon: cancel,
    })
  }

  /** The live instances that pass `filter`, read from etcd (`ERR_REGISTRY_UNAVAILABLE` when it cannot be). */
  instances(filter: InstanceFilter): Promise<Instance[]> {
    return listWith(this.client, this.address, filter)
  }

  /** Leaves the registry: the entry is removed (lease revoked), the watch ends. */
  async close(): Promise<void> {
    await this.publisher?.close()
    await this.view.close()
    this.client.close()
  }
}

async function listWith(client: Etcd3, address: RegistryAddress, filter: InstanceFilter): Promise<Instance[]> {
  const prefix = instancesPrefix(address)
  let kvs: { key: Buffer; value: Buffer }[]
  try {
    kvs = (await client.getAll().prefix(prefix).exec()).kvs
  } catch (error) {
    throw unavailable(address, `listing ${prefix}`, error)
  }
  const all = kvs.map((kv) => decodeInstance(kv.key.toString().slice(prefix.length), kv.value.toString()))
  return all
    .filter((instance): instance is Instance => instance !== undefined && matches(instance, filter))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
}

/**
 * The live instances in `registry` (`'etcd://host:port[,host:port…]/prefix'`) that pass
 * `filter`, by name: what `kvtransfer instances` prints. Rejects `ERR_REGISTRY_UNAVAILABLE`
 * when etcd cannot be read.
 */
export async function listInstances(registry: string, filter: InstanceFilter = {}): Promise<Instance[]> {
  const address = toRegistry('registry', registry)
  if (!address) throw invalidArgument('registry', `"" names no registry: give ${REGISTRY_FORM}`)
  const checked = toInstanceFilter(filter)
  const client = etcdClient(address)
  try {
    return await listWith(client, address, checked)
  } finally {
    client.close()
  }
}

/** Whether the registry answers (the doctor's check): its instance count, or why not. */
export async function probeRegistry(
  address: RegistryAddress,
): Promise<{ reachable: true; instances: number } | { reachable: false; error: string }> {
  try {
    return { reachable: true, instances: (await listInstances(address.url)).length }
  } catch (error) {
    return { reachable: false, error: (error as Error).message }
  }
}
