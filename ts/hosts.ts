/**
 * Host names and the addresses peers are keyed by. A peer is one peer whatever name reached
 * it: `connect('localhost', p)` and `isConnected('127.0.0.1', p)` name the same one. A name
 * is looked up asynchronously (`dns.lookup`: getaddrinfo on libuv's thread pool, never on
 * the event loop) and the answer kept, so later calls by that name find the same peer
 * without another lookup; `connect` looks its name up again every time (an address may
 * change when the peer restarts). IP literals and `localhost` (loopback, RFC 6761) need no
 * lookup.
 */
import { lookup } from 'node:dns/promises'
import { isIP } from 'node:net'

/** The address `localhost` (and `*.localhost`) names: IPv4 loopback, as the control plane's ZeroMQ sockets use IPv4. */
export const LOCALHOST_ADDRESS = '127.0.0.1'

export class Hosts {
  /** Lower-cased name → the address its last lookup chose. */
  private readonly addresses = new Map<string, string>()

  /** The address of `host` known without a lookup: an IP literal, `localhost`, or a name looked up before. */
  known(host: string): string | undefined {
    if (isIP(host)) return host
    const name = host.toLowerCase()
    if (name === 'localhost' || name.endsWith('.localhost')) return LOCALHOST_ADDRESS
    return this.addresses.get(name)
  }

  /** `host:port` as the engine keys peers: the address when known, else `host` as it is. */
  key(host: string, port: number): string {
    return `${this.known(host) ?? host}:${port}`
  }

  /**
   * Looks `host` up and keeps the answer (the first IPv4 address, else the first of any
   * family). Rejects with the resolver's error (`ENOTFOUND`, `EAI_AGAIN`, ...).
   */
  async lookup(host: string): Promise<string> {
    if (isIP(host)) return host
    const name = host.toLowerCase()
    if (name === 'localhost' || name.endsWith('.localhost')) return LOCALHOST_ADDRESS
    const all = await lookup(host, { all: true })
    const address = (all.find((entry) => entry.family === 4) ?? all[0]).address
    this.addresses.set(name, address)
    return address
  }
}

/** The resolver's reason, for messages: `getaddrinfo ENOTFOUND decode-0`. */
export function lookupFailure(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}
