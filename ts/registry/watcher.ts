/**
 * The registry's live view: every instance under the prefix, read once and then kept by an
 * etcd watch; reports instances that join and leave. During an etcd outage it keeps the
 * last entries it saw (what `connect` by name falls back on) and the watch resumes, from
 * the revision it had reached, when etcd returns.
 */
import { EventEmitter } from 'node:events'
import type { Etcd3, IKeyValue, Watcher } from 'etcd3'
import type { RegistryAddress } from '../options'
import { instancesPrefix, unavailable } from './client'
import { type Instance, type InstanceLeft, decodeInstance } from './entry'

export interface ViewEvents {
  joined: [Instance]
  left: [InstanceLeft]
}

export class InstanceView extends EventEmitter<ViewEvents> {
  /** The last entry seen of each live instance, by name. */
  readonly instances = new Map<string, Instance>()
  private watcher: Watcher | undefined
  private closed = false
  private readonly prefix: string

  constructor(
    private readonly client: Etcd3,
    private readonly address: RegistryAddress,
  ) {
    super()
    this.prefix = instancesPrefix(address)
  }

  /** Reads every entry, then watches from that revision on. */
  async start(): Promise<void> {
    let revision: string
    try {
      const all = await this.client.getAll().prefix(this.prefix).exec()
      for (const kv of all.kvs) this.put(kv)
      revision = all.header.revision
      const watcher = await this.client
        .watch()
        .prefix(this.prefix)
        .startRevision(String(BigInt(revision) + 1n))
        .create()
      watcher.on('put', (kv) => this.put(kv))
      watcher.on('delete', (kv) => this.delete(kv))
      // Reconnects are the client's (with back-off); errors are reported through them.
      watcher.on('error', () => undefined)
      if (this.closed) await watcher.cancel().catch(() => undefined)
      else this.watcher = watcher
    } catch (error) {
      throw unavailable(this.address, `reading ${this.prefix}`, error)
    }
  }

  private nameOf(kv: IKeyValue): string {
    return kv.key.toString().slice(this.prefix.length)
  }

  private put(kv: IKeyValue): void {
    const name = this.nameOf(kv)
    const instance = decodeInstance(name, kv.value.toString())
    if (!instance) return
    const known = this.instances.get(name)
    this.instances.set(name, instance)
    // A re-publication of the same instance (a new lease after an etcd outage) is no join.
    if (known?.id !== instance.id) {
      if (known) this.emit('left', { name, instance: known })
      this.emit('joined', instance)
    }
  }

  private delete(kv: IKeyValue): void {
    const name = this.nameOf(kv)
    const known = this.instances.get(name)
    if (!known) return
    this.instances.delete(name)
    this.emit('left', { name, instance: known })
  }

  /** Resolves with `name`'s entry once it is seen (now or later); `cancel` stops waiting. */
  appearance(name: string): { seen: Promise<Instance>; cancel: () => void } {
    let cancel = () => undefined as void
    const seen = new Promise<Instance>((resolve) => {
      const known = this.instances.get(name)
      if (known) return resolve(known)
      const listener = (instance: Instance) => {
        if (instance.name !== name) return
        this.off('joined', listener)
        resolve(instance)
      }
      this.on('joined', listener)
      cancel = () => this.off('joined', listener)
    })
    return { seen, cancel }
  }

  async close(): Promise<void> {
    this.closed = true
    const watcher = this.watcher
    this.watcher = undefined
    await watcher?.cancel().catch(() => undefined)
  }
}
