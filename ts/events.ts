/**
 * The events of an `RDMACommunicator`, by name, with what their listeners get: the
 * communicator's `on`, `once`, `off`, `emit`, ... take these names only, so that a misspelt
 * name or a listener of the wrong type does not compile.
 */
import type { Arrival } from './arrivals'
import type { KvTransferErrorCode } from './errors'
import type { Instance, InstanceLeft } from './registry/entry'

/** A connected peer whose connection stopped being usable: `connect` again to write to it. */
export interface PeerLeft {
  /** The peer, `ip:port` as connected (what `writeCache`, metrics and `peerInfo` name it by). */
  peer: string
  /**
   * Why, as a stable code: `ERR_PEER_DISCONNECTED` (its process died or closed its
   * communicator, the connection was lost), `ERR_TIMEOUT` (a call to it timed out and
   * the connection was torn down), `ERR_ABORTED` (a call's signal aborted it while it
   * was pending, or `abortPeer`), or the transport's own error (`ERR_RDMA_COMPLETION`,
   * `ERR_PROTOCOL`, ...).
   */
  code: KvTransferErrorCode
  /** What happened, in a sentence. */
  reason: string
}

/** Every event of an `RDMACommunicator` and its listener. */
export interface CommunicatorEvents {
  /**
   * Receiving side: every byte of a tagged `writeCache` call is in this side's memory.
   * Emitted once per tagged call.
   */
  arrival: (arrival: Arrival) => void
  /**
   * Writing side: a peer this side connected to left: its connection broke (the peer's
   * process died or closed, the connection was lost) or was torn down (a call timed out
   * or was aborted, `abortPeer`). Once per connection, when the engine finds out (a
   * killed process at once over TCP and NVLink; over RDMA when a write to it fails). Not
   * emitted when this side ends the connection itself (`close`, a `connect` that
   * replaces it).
   */
  'peer-left': (left: PeerLeft) => void
  /**
   * With a registry: an instance published its entry (seen through the etcd watch; this
   * communicator's own entry included).
   */
  'instance-joined': (instance: Instance) => void
  /**
   * With a registry: an instance's entry is gone: it closed, or its lease expired (its
   * process or host vanished, or it lost etcd for longer than its TTL). Links to its
   * control address were torn down first: their pending calls fail `ERR_PEER_DISCONNECTED`.
   */
  'instance-left': (left: InstanceLeft) => void
}

/** The name of an event of an `RDMACommunicator`. */
export type CommunicatorEvent = keyof CommunicatorEvents

/** Each event's listener arguments: the class's typed `on`, `emit`, … (Node's `EventEmitter<T>`). */
export type CommunicatorEventArgs = { [E in CommunicatorEvent]: Parameters<CommunicatorEvents[E]> }
