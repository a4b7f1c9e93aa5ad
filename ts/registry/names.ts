/**
 * Instance names in the communicator's calls: `connect(name)` resolves the name through the
 * registry and connects to the control address it names; later calls find the peer by
 * name here, without asking etcd (the data plane never waits on the registry).
 */
import { KvTransferError, invalidArgument } from '../errors'
import { type ConnectOptions, type RegistryAddress, checkSignal, toHost, toOptions, toTimeout } from '../options'
import type { Peer } from '../peer'
import { type Instance, toInstanceFilter } from './entry'
import { Membership, type MembershipHooks } from './index'

/** What the communicator lends: its own `connect(ip, port)` and `peer(ip, port)`. */
export interface NameTarget {
  connect(ip: string, port: number, options: ConnectOptions): Promise<boolean>
  peer(ip: string, port: number): Peer
}

export class Names {
  /** The peers connected by name. */
  private readonly peers = new Map<string, Peer>()

  /** The names of a communicator with these settings: a registry membership when configured. */
  static of(
    settings: { registry: RegistryAddress | undefined; registryTtlSeconds: number },
    defaultTimeoutMs: number | undefined,
    events: MembershipHooks,
  ): Names {
    const { registry, registryTtlSeconds } = settings
    return new Names(registry && new Membership(registry, registryTtlSeconds, events), defaultTimeoutMs)
  }

  constructor(
    /** The communicator's place in the registry; undefined: it has none. */
    readonly membership: Membership | undefined,
    private readonly defaultTimeoutMs: number | undefined,
  ) {}

  /** `instances(filter)`: checked, then read from etcd (`ERR_REGISTRY_UNAVAILABLE` when it cannot be). */
  instances(filter: unknown): Promise<Instance[]> {
    const checked = toInstanceFilter(filter)
    if (!this.membership)
      throw invalidArgument('registry', 'instances(filter) needs the registry option or KVCACHE_REGISTRY')
    return this.membership.instances(checked)
  }

  /** `connect(name, options?)`: resolves `name` (see `Membership.resolve`), then connects. */
  async connect(target: NameTarget, name: string, given: ConnectOptions | undefined): Promise<boolean> {
    toHost('name', name)
    const options = toOptions('options', given)
    if (!this.membership) {
      throw invalidArgument(
        'registry',
        `connect(${JSON.stringify(name)}) without a port connects to the instance of that name, which needs the registry option or KVCACHE_REGISTRY; else give ip, port`,
      )
    }
    const timeoutMs =
      options.timeoutMs === undefined ? this.defaultTimeoutMs : toTimeout('timeoutMs', options.timeoutMs)
    const signal = checkSignal('signal', options.signal)
    const started = Date.now()
    const instance = await this.membership.resolve(name, { timeoutMs, signal })
    // What is left of the timeout for the handshake (0: none).
    const left = timeoutMs === undefined ? 0 : Math.max(1, Math.ceil(timeoutMs - (Date.now() - started)))
    const { host, port } = instance.control
    await target.connect(host, port, { ...options, timeoutMs: left })
    this.peers.set(name, target.peer(host, port))
    return true
  }

  /** The peer connected as `name`; `ERR_NOT_CONNECTED` when none was. */
  peer(name: string): Peer {
    const peer = this.peers.get(name)
    if (peer) return peer
    throw new KvTransferError(
      'ERR_NOT_CONNECTED',
      `no peer is connected by the name ${JSON.stringify(name)}: call connect(${JSON.stringify(name)}) first`,
    )
  }

  clear(): void {
    this.peers.clear()
  }
}
