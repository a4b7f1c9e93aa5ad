/**
 * `kvtransfer doctor`: on this host (TCP usable; RDMA not, saying why) and in the Soft-RoCE
 * VM (KVTRANSFER_TEST_TRANSPORT=rdma: rxe0 port 1 ACTIVE, the RoCE v2 GID picked). The CLI
 * is run as a user runs it; its exit status follows --transport.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { TRANSPORT } from './helpers.js'
import { doctor, type DoctorReport } from '../lib/index.js'

const CLI = fileURLToPath(new URL('../lib/cli.js', import.meta.url))

function run(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, 'doctor', ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
  })
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

function report(env: Record<string, string> = {}): DoctorReport {
  const r = run(['--json'], env)
  if (r.status !== 0) throw new Error(`doctor --json exited ${r.status}: ${r.stderr}`)
  return JSON.parse(r.stdout) as DoctorReport
}

test('every transport is reported in the order auto prefers them; tcp is usable', (t) => {
  const r = report()
  const names = r.transports.map((x) => x.name)
  t.true(names.indexOf('rdma') >= 0 && names.indexOf('rdma') < names.indexOf('tcp'), names.join(','))
  const tcp = r.transports.find((x) => x.name === 'tcp')!
  t.true(tcp.usable, tcp.reason)
  t.true(tcp.reason.startsWith('tcp: usable'), tcp.reason)
  t.is(r.settingsError, null)
  // The same report through the package's API.
  t.deepEqual(
    doctor().transports.map((x) => [x.name, x.usable]),
    r.transports.map((x) => [x.name, x.usable]),
  )
  t.is(run(['--transport', 'tcp']).status, 0)
})

test('rdma: usable in the VM with rxe0 port 1 and the RoCE v2 GID; elsewhere refused with the reason', (t) => {
  const r = report()
  const rdma = r.transports.find((x) => x.name === 'rdma')!
  const cli = run(['--transport', 'rdma'])
  if (TRANSPORT === 'rdma') {
    t.true(rdma.usable, rdma.reason)
    t.is(cli.status, 0, cli.stdout + cli.stderr)
    const device = process.env.KVTRANSFER_RDMA_DEVICE ?? 'rxe0'
    const gidIndex = process.env.KVTRANSFER_GID_INDEX ?? '1'
    const port = r.rdma.devices.find((d) => d.name === device)?.ports.find((p) => p.port === 1)
    t.is(port?.state, 'ACTIVE')
    t.is(port?.gids.find((g) => String(g.index) === gidIndex)?.kind, 'RoCE v2')
    t.is(rdma.details.device, device)
    t.is(rdma.details.gidIndex, gidIndex)
    t.regex(cli.stdout, new RegExp(`GID ${gidIndex} +RoCE v2 .*<- kvtransfer uses this one`))
    return
  }
  if (rdma.usable) {
    // A host with a real RDMA port outside the VM: the CLI agrees with the report.
    t.is(cli.status, 0)
    t.truthy(rdma.details.gidIndex)
    return
  }
  t.is(cli.status, 1, 'an unusable --transport exits 1')
  t.true(rdma.reason.startsWith('rdma: '), rdma.reason)
  t.true(rdma.reason.length > 'rdma: '.length + 10, rdma.reason)
  t.true(cli.stdout.includes(`NOT USABLE: ${rdma.reason}`), cli.stdout)
  // Why the host has none is said in the RDMA section too.
  t.truthy(r.rdma.error ?? r.rdma.devices.find((d) => d.ports.every((p) => p.state !== 'ACTIVE')))
})

test('the NICs GPU regions would get are shown with why: nearest the GPU, or every active port and the reason', (t) => {
  const r = report()
  // With a GPU and RDMA NICs: the nearest ones and how near; elsewhere why locality is unknown.
  t.regex(
    r.rdma.gpuNics,
    /^(nearest GPU [0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]: \S+ \(same |every active port: the GPU's locality is unknown \(.+\))/,
  )
  const cli = run([])
  t.true(cli.stdout.includes(`NICs for GPU regions on gpuIdx 0, none named: ${r.rdma.gpuNics}`), cli.stdout)
  if (TRANSPORT === 'rdma') {
    // The VM's probe over host memory: no GPU regions, so every active port, or the named ones.
    const rdma = r.transports.find((x) => x.name === 'rdma')!
    t.regex(rdma.details.nics ?? '', /^(every active port: no GPU regions|named by KVCACHE_RDMA_NICS: rxe)/)
  }
})

test('a malformed KVCACHE_* variable is named with the error a communicator gets; no transport is usable', (t) => {
  const env = { KVCACHE_IB_TIMEOUT: '99', KVCACHE_RDMA_GID_IDX: '1' }
  const r = report(env)
  const bad = r.variables.find((v) => v.name === 'KVCACHE_IB_TIMEOUT')!
  t.is(bad.value, '99')
  t.regex(bad.error ?? '', /KVCACHE_IB_TIMEOUT.*'99'.*14\.\.=31/)
  t.is(r.settingsError, bad.error)
  t.false(r.variables.find((v) => v.name === 'KVCACHE_RDMA_GID_IDX')!.known)
  t.true(r.transports.every((x) => !x.usable && x.reason.includes('KVCACHE_IB_TIMEOUT')))
  const cli = run(['--transport', 'tcp'], env)
  t.is(cli.status, 1)
  t.regex(cli.stdout, /KVCACHE_IB_TIMEOUT=99 +MALFORMED/)
  t.regex(cli.stdout, /KVCACHE_RDMA_GID_IDX=1 +not read by kvtransfer/)
})

test('the human table names each section; unknown --transport is a usage error', (t) => {
  const out = run([])
  t.is(out.status, 0)
  for (const section of ['Transports', 'RDMA', 'GPUs', 'KVCACHE_* variables']) t.true(out.stdout.includes(section))
  const bad = run(['--transport', 'ib'])
  t.is(bad.status, 2)
  t.regex(bad.stderr, /--transport expects one of .*tcp.*, got .ib./)
})
