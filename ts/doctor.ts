/**
 * `kvtransfer doctor`: what this host can do, for a user setting it up. Everything is probed
 * by the engine (crates/engine/src/doctor.rs); this file only names the fields and prints
 * them as a table.
 */
import { nativeDoctor } from '../index.js'
import { describeValue, invalidArgument, native } from './errors'
import { checkType, toOptions } from './options'
import type { NativeDoctorGid, NativeDoctorGpu, NativeDoctorPort, NativeDoctorReport } from '../index.js'

/** One GID table entry: index, kind (`RoCE v2`, `RoCE v1`, `IB`, `unknown`), address (IPv6 text). */
export type DoctorGid = NativeDoctorGid
/** One port: state (`ACTIVE`, `DOWN`, ... as ibv_devinfo), linkLayer, activeMtu (bytes), lid, gids. */
export type DoctorPort = NativeDoctorPort
/** One GPU: ordinal, name, uuid, pciBusId, totalMemory (bytes), dmabuf (the GPU and driver can export dma-bufs). */
export type DoctorGpu = NativeDoctorGpu

export interface DoctorRdmaDevice {
  name: string
  /** Soft-RoCE / soft-iWARP (the protocol runs on the CPU). */
  software: boolean
  /** Relaxed ordering enabled on the device's PCIe function; null: no PCI function or unreadable. */
  pcieRelaxedOrdering: boolean | null
  ports: DoctorPort[]
  error: string | null
}

export interface DoctorRdma {
  /** Why libibverbs is unusable or lists no device; null when it lists some. */
  error: string | null
  devices: DoctorRdmaDevice[]
  /** `ibv_reg_dmabuf_mr` exists: GPU memory can be registered through dma-buf. */
  dmabufRegistration: boolean
  /** `ibv_reg_mr_iova2` exists: the relaxed-ordering flag (KVCACHE_RELAX_ORDERING) reaches the device. */
  relaxedOrderingFlag: boolean
  /** `nvidia_peermem` / `nv_peer_mem` when loaded (GPU memory through plain ibv_reg_mr). */
  peermemModule: string | null
  /**
   * The devices a communicator with GPU regions on `gpuIdx` writes over when none are named
   * (`rdmaDevices`, `KVCACHE_RDMA_NICS`), and why: `nearest GPU 0000:1a:00.0: mlx5_0 (same
   * PCIe switch); farther: ...`, or `every active port: ...` with the reason.
   */
  gpuNics: string
}

export interface DoctorGpus {
  /** `no CUDA driver: ...`, `no GPUs`, or the driver call that failed. */
  error: string | null
  /** e.g. `12.4`. */
  driverVersion: string | null
  gpus: DoctorGpu[]
  /** `peerAccess[a][b]`: GPU a can access GPU b's memory (`cuDeviceCanAccessPeer`). */
  peerAccess: boolean[][]
}

export interface DoctorVariable {
  name: string
  /** What is set (KVCACHE_AUTH_TOKEN: only its length). */
  value: string
  meaning: string
  /** False for a `KVCACHE_*` name kvtransfer does not read (a typo?). */
  known: boolean
  /** The message a communicator's construction fails with, when malformed. */
  error: string | null
}

export interface DoctorTransport {
  name: string
  usable: boolean
  /** A sentence starting with the name: what it uses, or why it cannot be used. */
  reason: string
  /** What it uses on this side (device, port, gidIndex, gid, mtu, qpsPerPeer; bindAddress). */
  details: Record<string, string>
}

export interface DoctorReport {
  /** The gpuIdx the transports were opened for (it selects the RDMA NIC). */
  gpuIdx: number
  variables: DoctorVariable[]
  /** The error a communicator created now would fail with (a malformed variable), or null. */
  settingsError: string | null
  rdma: DoctorRdma
  gpus: DoctorGpus
  /** Every transport, in the order `auto` prefers them. */
  transports: DoctorTransport[]
}

/**
 * What this host can do for a communicator with `gpuIdx`: RDMA devices, GPUs, `KVCACHE_*`
 * variables, and whether each transport can be used (each is opened and closed again,
 * exactly as a communicator opens it).
 */
export function doctor(options: { gpuIdx?: number } = {}): DoctorReport {
  const { gpuIdx } = toOptions('options', options)
  // The type here; the value (a whole number) in the binding.
  if (gpuIdx !== undefined) checkType('gpuIdx', gpuIdx, 'number')
  const r: NativeDoctorReport = native(() => nativeDoctor(gpuIdx))
  return {
    gpuIdx: r.gpuIdx,
    variables: r.variables.map((v) => ({ ...v, error: v.error ?? null })),
    settingsError: r.settingsError ?? null,
    rdma: {
      error: r.rdma.error ?? null,
      devices: r.rdma.devices.map((d) => ({
        name: d.name,
        software: d.software,
        pcieRelaxedOrdering: d.pcieRelaxedOrdering ?? null,
        ports: d.ports,
        error: d.error ?? null,
      })),
      dmabufRegistration: r.rdma.dmabufRegistration,
      relaxedOrderingFlag: r.rdma.relaxedOrderingFlag,
      peermemModule: r.rdma.peermemModule ?? null,
      gpuNics: r.rdma.gpuNics,
    },
    gpus: {
      error: r.gpus.error ?? null,
      driverVersion: r.gpus.driverVersion ?? null,
      gpus: r.gpus.gpus,
      peerAccess: r.gpus.peerAccess,
    },
    transports: r.transports.map((t) => ({ ...t, details: { ...t.details } })),
  }
}

const yes = (b: boolean): string => (b ? 'yes' : 'no')

function table(rows: string[][], indent = '  '): string[] {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)))
  return rows.map((r) =>
    (indent + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).trimEnd(),
  )
}

/** The report as the human-readable table `kvtransfer doctor` prints. */
export function formatDoctor(report: DoctorReport): string {
  if (typeof report !== 'object' || report === null || !Array.isArray(report.transports)) {
    throw invalidArgument('report', `expected what doctor() returns, got ${describeValue(report)}`)
  }
  const out: string[] = [`kvtransfer doctor (gpuIdx ${report.gpuIdx})`, '']
  out.push('Transports (in the order auto prefers them)')
  out.push(...table(report.transports.map((t) => [t.name, t.usable ? 'usable' : 'NOT usable', t.reason])))
  const rdma = report.transports.find((t) => t.name === 'rdma')?.details ?? {}

  // Every rail's pick: "rxe0 port 1 (2500 Mb/s): GID index 1 (10.77.0.1/24 RoCE v2): why; ..."
  const rails = (rdma.rails ?? '')
    .split('; ')
    .map((entry) => /^(\S+) port (\d+) \(\d+ Mb\/s\): GID index (\d+):? (.*)$/.exec(entry))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ device: m[1], port: m[2], gidIndex: m[3], why: m[4] }))
  out.push('', 'RDMA')
  out.push(
    `  libibverbs: dma-buf registration ${yes(report.rdma.dmabufRegistration)}, ` +
      `relaxed-ordering flag ${yes(report.rdma.relaxedOrderingFlag)}; ` +
      `peermem module: ${report.rdma.peermemModule ?? 'not loaded'}`,
  )
  if (report.rdma.error) out.push(`  ${report.rdma.error}`)
  if (rdma.nics) out.push(`  NICs used (host regions): ${rdma.nics}`)
  out.push(`  NICs for GPU regions on gpuIdx ${report.gpuIdx}, none named: ${report.rdma.gpuNics}`)
  if (rdma.resourcesPerPeer) out.push(`  per peer: ${rdma.resourcesPerPeer}`)
  for (const d of report.rdma.devices) {
    const ro = d.pcieRelaxedOrdering === null ? 'n/a' : d.pcieRelaxedOrdering ? 'enabled' : 'disabled'
    out.push(`  ${d.name}${d.software ? ' (software provider)' : ''}, PCIe relaxed ordering ${ro}`)
    if (d.error) out.push(`    ${d.error}`)
    for (const p of d.ports) {
      out.push(`    port ${p.port}: ${p.state}, ${p.linkLayer}, MTU ${p.activeMtu || '?'}, LID ${p.lid}`)
      const rail = rails.find((r) => r.device === d.name && r.port === String(p.port))
      const rows = p.gids.map((g) => {
        const picked = rail
          ? rail.gidIndex === String(g.index)
          : rdma.device === d.name && rdma.port === String(p.port) && rdma.gidIndex === String(g.index)
        return [`GID ${g.index}`, g.kind, g.address, picked ? '<- kvtransfer uses this one' : '']
      })
      if (rows.length > 0) out.push(...table(rows, '      '))
      if (rail) out.push(`      why: ${rail.why}`)
    }
  }

  out.push('', 'GPUs')
  if (report.gpus.driverVersion) out.push(`  CUDA driver ${report.gpus.driverVersion}`)
  if (report.gpus.error) out.push(`  ${report.gpus.error}`)
  if (report.gpus.gpus.length > 0) {
    out.push(
      ...table(
        report.gpus.gpus.map((g) => [
          String(g.ordinal),
          g.name,
          g.uuid,
          g.pciBusId,
          `${(g.totalMemory / 2 ** 30).toFixed(1)} GiB`,
          `dma-buf ${yes(g.dmabuf)}`,
        ]),
      ),
    )
    out.push('  peer access (row can access column):')
    const header = ['', ...report.gpus.gpus.map((g) => String(g.ordinal))]
    const rows = report.gpus.peerAccess.map((row, a) => [String(a), ...row.map((v, b) => (a === b ? '-' : yes(v)))])
    out.push(...table([header, ...rows], '    '))
  }

  out.push('', 'KVCACHE_* variables')
  if (report.variables.length === 0) out.push('  none set')
  for (const v of report.variables) {
    const note = v.error ? `MALFORMED: ${v.error}` : v.known ? v.meaning : 'not read by kvtransfer (a typo?)'
    out.push(`  ${v.name}=${v.value}  ${note}`)
  }
  if (report.settingsError) out.push(`  a communicator created now fails with: ${report.settingsError}`)
  return out.join('\n') + '\n'
}
