/**
 * `kvtransfer instances`: the fleet in a registry, as a table or JSON; and the registry
 * line of `kvtransfer doctor`.
 */
import { parseArgs } from 'node:util'
import { UsageError, integer } from '../cli-args'
import { KvTransferError } from '../errors'
import { type RegistryAddress, registryFromEnv, toRegistry } from '../options'
import { type Instance, type InstanceFilter, listInstances, probeRegistry } from './index'

const INSTANCES_HELP = `Usage: kvtransfer instances [--registry URL] [--role prefill|decode] [--tp-rank N] [--json]

Lists the live instances of an etcd registry (communicators created with the registry
option or KVCACHE_REGISTRY): name, role, tensor-parallel size and rank, layout, preferred
transport, control address, host and process.

  --registry URL       etcd://host:port[,host:port…]/prefix (default: KVCACHE_REGISTRY)
  --role R             only prefill or only decode instances
  --tp-rank N          only instances of tensor-parallel rank N
  --json               a JSON array on stdout (one object per instance, as comm.instances() returns)

Exit status: 0; 1 when the registry cannot be read; 2 on a usage error.
`

/** The registry named by `--registry`, else KVCACHE_REGISTRY; usage errors name which. */
export function registryArgument(given: string | undefined): RegistryAddress | undefined {
  try {
    return given === undefined ? registryFromEnv() : toRegistry('--registry', given)
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
}

export async function runInstances(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      registry: { type: 'string' },
      role: { type: 'string' },
      'tp-rank': { type: 'string' },
      json: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    process.stdout.write(INSTANCES_HELP)
    return 0
  }
  const address = registryArgument(values.registry)
  if (!address) throw new UsageError('no registry: give --registry etcd://host:port/prefix or set KVCACHE_REGISTRY')
  const role = values.role
  if (role !== undefined && role !== 'prefill' && role !== 'decode')
    throw new UsageError(`--role expects prefill or decode, got '${role}'`)
  const filter: InstanceFilter = { role }
  if (values['tp-rank'] !== undefined) filter.tpRank = integer('tp-rank', values['tp-rank'], 0, 0)
  let instances: Instance[]
  try {
    instances = await listInstances(address.url, filter)
  } catch (error) {
    if (!(error instanceof KvTransferError) || error.code !== 'ERR_REGISTRY_UNAVAILABLE') throw error
    process.stderr.write(`kvtransfer: ${error.message}\n`)
    return 1
  }
  process.stdout.write(values.json ? `${JSON.stringify(instances, null, 2)}\n` : formatInstances(address, instances))
  return 0
}

/** The instances as a table, one line each. */
export function formatInstances(address: RegistryAddress, instances: Instance[]): string {
  const header = ['NAME', 'ROLE', 'TP', 'LAYERS', 'BLOCKS', 'BLOCK BYTES', 'TRANSPORT', 'CONTROL', 'HOST', 'PID']
  const rows = instances.map((i) => [
    i.name,
    i.role,
    `${i.tpRank}/${i.tpSize}`,
    String(i.layout.layers),
    String(i.layout.blockNumber),
    String(i.layout.blockBytes),
    i.transport,
    `${i.control.host}:${i.control.port}`,
    i.hostname,
    String(i.pid),
  ])
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)))
  const line = (cells: string[]) =>
    cells
      .map((cell, c) => cell.padEnd(widths[c]))
      .join('  ')
      .trimEnd()
  const count = `${instances.length} instance${instances.length === 1 ? '' : 's'} in ${address.url}`
  return `${[line(header), ...rows.map(line)].join('\n')}\n${count}\n`
}

/** The doctor's registry line: reachable (with its instance count) or why not; ok is false when not. */
export async function registryReport(address: RegistryAddress): Promise<{ ok: boolean; text: string }> {
  const probe = await probeRegistry(address)
  return probe.reachable
    ? { ok: true, text: `registry ${address.url}: reachable, ${probe.instances} live instances` }
    : { ok: false, text: `registry ${address.url}: NOT REACHABLE: ${probe.error}` }
}
