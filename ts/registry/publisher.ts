/**
 * Publishes one instance under a lease with keep-alive: the entry is created only where no
 * other instance holds the name, is gone when the lease expires (this process vanished or
 * lost etcd for longer than the TTL), and is published again when etcd returns.
 */
import type { Etcd3, Lease } from 'etcd3'
import { KvTransferError } from '../errors'
import type { RegistryAddress } from '../options'
import { unavailable } from './client'
import { type Instance, decodeInstance, encodeInstance } from './entry'

/** Pause between attempts to publish again after the lease was lost (ms). */
const REPUBLISH_DELAY_MS = 500

export class Publisher {
  private lease: Lease | undefined
  private closed = false
  private retry: NodeJS.Timeout | undefined

  constructor(
    private readonly client: Etcd3,
    private readonly address: RegistryAddress,
    private readonly key: string,
    private readonly entry: Instance,
    private readonly ttlSeconds: number,
  ) {}

  /**
   * Publishes the entry; rejects `ERR_NAME_TAKEN` when another live instance holds the
   * name, `ERR_REGISTRY_UNAVAILABLE` when etcd cannot be reached.
   */
  async start(): Promise<void> {
    await this.publish()
  }

  private async publish(): Promise<void> {
    const lease = this.client.lease(this.ttlSeconds)
    // A lost lease (etcd said it expired, or no keep-alive went through for its TTL): publish
    // under a new one once etcd answers again.
    lease.on('lost', () => this.lost(lease))
    let leaseId: string
    try {
      leaseId = await lease.grant()
    } catch (error) {
      lease.release()
      throw unavailable(this.address, 'granting a lease', error)
    }
    try {
      await this.claim(leaseId)
    } catch (error) {
      await lease.revoke().catch(() => lease.release())
      throw error
    }
    if (this.closed) {
      await lease.revoke().catch(() => lease.release())
      return
    }
    const previous = this.lease
    this.lease = lease
    previous?.release()
  }

  /**
   * Puts the entry under `leaseId` where the key is free, or held by this same instance (an
   * earlier lease of ours that etcd still keeps): one transaction, so two instances racing
   * for a name cannot both win.
   */
  private async claim(leaseId: string): Promise<void> {
    const value = encodeInstance(this.entry)
    let held: string | null
    try {
      const created = await this.client
        .if(this.key, 'Create', '==', 0)
        .then(this.client.put(this.key).value(value).lease(leaseId))
        .commit()
      if (created.succeeded) return
      const current = await this.client.get(this.key).exec()
      const kv = current.kvs[0]
      held = kv ? kv.value.toString() : null
      if (kv && decodeInstance(this.entry.name, held ?? '')?.id === this.entry.id) {
        const taken = await this.client
          .if(this.key, 'Mod', '==', kv.mod_revision)
          .then(this.client.put(this.key).value(value).lease(leaseId))
          .commit()
        if (taken.succeeded) return
      } else if (!kv) {
        return await this.claim(leaseId) // it expired in between
      }
    } catch (error) {
      throw unavailable(this.address, `publishing ${this.key}`, error)
    }
    const other = held === null ? undefined : decodeInstance(this.entry.name, held)
    const by = other
      ? ` by ${other.hostname} pid ${other.pid} (control ${other.control.host}:${other.control.port})`
      : ''
    throw new KvTransferError(
      'ERR_NAME_TAKEN',
      `name ${JSON.stringify(this.entry.name)} is already taken in registry ${this.address.url}${by}: give this communicator another name`,
    )
  }

  private lost(lease: Lease): void {
    if (this.closed || lease !== this.lease) return
    this.lease = undefined
    this.scheduleRepublish()
  }

  private scheduleRepublish(): void {
    if (this.closed || this.retry) return
    this.retry = setTimeout(() => {
      this.retry = undefined
      // Until etcd answers; a name taken meanwhile by another instance is tried again too
      // (its holder may go), and peers see this entry once it is back.
      this.publish().catch(() => this.scheduleRepublish())
    }, REPUBLISH_DELAY_MS)
    // Never keeps the process running by itself.
    this.retry.unref()
  }

  /** Stops publishing and removes the entry (revokes the lease; best effort within a bound). */
  async close(): Promise<void> {
    this.closed = true
    clearTimeout(this.retry)
    const lease = this.lease
    this.lease = undefined
    if (lease) await lease.revoke().catch(() => lease.release())
  }
}
