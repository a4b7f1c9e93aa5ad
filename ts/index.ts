/**
 * kvtransfer: KV-cache transfer between prefill and decode communicators.
 *
 * @packageDocumentation
 */
export { RDMACommunicator } from './communicator'
export { KvTransferError } from './errors'
export { Peer } from './peer'
export { PreparedBlocks } from './prepared'
export { DeviceMemory } from './device-memory'
export type { KvTransferErrorCode } from './errors'
export type {
  BlockIds,
  BlockLayout,
  CacheRegion,
  Checksum,
  Delivery,
  SharedRegion,
  CloseOptions,
  CommunicatorOptions,
  CommunicatorStats,
  ConnectOptions,
  FenceOptions,
  PeerInfo,
  Rail,
  Role,
  Transport,
  WriteOptions,
} from './options'
export type { RequestTag } from './tags'
export type { FenceResult, FenceTarget } from './fences'
export type { Arrival, WaitOptions } from './arrivals'
export type { CommunicatorEvent, CommunicatorEvents, PeerLeft } from './events'
export type { Instance, InstanceFilter, InstanceLayout, InstanceLeft } from './registry'
export { listInstances } from './registry'
export { METRICS_CONTENT_TYPE, metricsHandler, metricsText } from './metrics'
export type { Counters, LatencySummary, Metrics, PeerMetrics } from './metrics'
export { doctor, formatDoctor } from './doctor'
export type {
  DoctorGid,
  DoctorGpu,
  DoctorGpus,
  DoctorPort,
  DoctorRdma,
  DoctorRdmaDevice,
  DoctorReport,
  DoctorTransport,
  DoctorVariable,
} from './doctor'
export { Sidecar, defaultSocketPath } from './sidecar/serve'
export type { SidecarOptions } from './sidecar/serve'
export { SIDECAR_PROTOCOL } from './sidecar/protocol'
export { formatSidecarStatus, sidecarStatus } from './sidecar/status'
export type { SidecarStatus, SidecarWorkerStatus } from './sidecar/status'
