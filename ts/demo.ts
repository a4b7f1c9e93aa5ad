/**
 * The main job: a decode process and a prefill process on loopback over the default
 * transport. The prefill side fills its cache with random blocks and pushes a random
 * selection, layer by layer, into the decode side's blocks; the decode side waits for the
 * arrival notices, then checks every written block against the prefill side's SHA-256
 * digests and every other block for zeros. Exit code 0 only if all bytes are right.
 */
import { fork } from 'node:child_process'
import { createHash, randomInt } from 'node:crypto'
import { communicatorOnHostRegions } from './setup'

const LAYERS = Number(process.env.DEMO_LAYERS ?? 8)
const BLOCK_BYTES = Number(process.env.DEMO_BLOCK_BYTES ?? 64 * 1024)
const PREFILL_BLOCKS = Number(process.env.DEMO_PREFILL_BLOCKS ?? 512)
const DECODE_BLOCKS = Number(process.env.DEMO_DECODE_BLOCKS ?? 640)
const BATCH = Number(process.env.DEMO_BATCH ?? 384)
const TAG = 'demo-request-1'

type Message =
  | { kind: 'listening'; port: number; transport: string }
  | { kind: 'plan'; local: number[]; remote: number[]; digests: string[] }
  | { kind: 'result'; ok: boolean; detail: string }
  | { kind: 'written'; seconds: number; bytes: number; transport: string }

function digest(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex')
}

function send(message: Message): void {
  process.send?.(message)
}

function nextMessage<K extends Message['kind']>(kind: K): Promise<Extract<Message, { kind: K }>> {
  return new Promise((resolve) => {
    const onMessage = (message: Message) => {
      if (message.kind === kind) {
        process.off('message', onMessage)
        resolve(message as Extract<Message, { kind: K }>)
      }
    }
    process.on('message', onMessage)
  })
}

async function decodeMain(): Promise<void> {
  const { comm, keys, values } = communicatorOnHostRegions({
    role: 'decode',
    layers: LAYERS,
    fill: 'zeros',
    blockNumber: DECODE_BLOCKS,
    blockBytes: BLOCK_BYTES,
  })
  await comm.ready
  const planned = nextMessage('plan')
  send({ kind: 'listening', port: comm.port, transport: comm.transport })
  const plan = await planned
  await comm.waitForArrival(TAG, { layers: LAYERS, timeoutMs: 120_000 })
  const problems: string[] = []
  const written = new Map(plan.remote.map((r, i) => [r, i]))
  for (let layer = 0; layer < LAYERS; layer++) {
    for (const [kind, region] of [
      ['K', keys[layer]],
      ['V', values[layer]],
    ] as const) {
      for (let block = 0; block < DECODE_BLOCKS; block++) {
        const bytes = region.subarray(block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES)
        const i = written.get(block)
        if (i === undefined) {
          if (bytes.some((b) => b !== 0))
            problems.push(`layer ${layer} ${kind} block ${block} was not listed but changed`)
        } else if (digest(bytes) !== plan.digests[(layer * 2 + (kind === 'K' ? 0 : 1)) * plan.local.length + i]) {
          problems.push(`layer ${layer} ${kind} block ${block} differs from prefill block ${plan.local[i]}`)
        }
      }
    }
  }
  send({
    kind: 'result',
    ok: problems.length === 0,
    detail:
      problems.length === 0
        ? `verified ${LAYERS} layers × ${DECODE_BLOCKS} blocks × K+V`
        : problems.slice(0, 5).join('; '),
  })
  await comm.close()
}

async function prefillMain(decodePort: number): Promise<void> {
  const { comm, keys, values } = communicatorOnHostRegions({
    role: 'prefill',
    layers: LAYERS,
    fill: 'random',
    blockNumber: PREFILL_BLOCKS,
    blockBytes: BLOCK_BYTES,
  })
  // A random selection: distinct local ids, distinct remote ids, partly contiguous.
  const pick = (n: number, k: number) => {
    const ids = Array.from({ length: n }, (_, i) => i)
    for (let i = n - 1; i > 0; i--) {
      const j = randomInt(i + 1)
      ;[ids[i], ids[j]] = [ids[j], ids[i]]
    }
    return ids.slice(0, k)
  }
  const local = pick(PREFILL_BLOCKS, BATCH)
  const remote = pick(DECODE_BLOCKS, BATCH)
  const digests: string[] = []
  for (let layer = 0; layer < LAYERS; layer++) {
    for (const region of [keys[layer], values[layer]]) {
      for (const id of local) digests.push(digest(region.subarray(id * BLOCK_BYTES, (id + 1) * BLOCK_BYTES)))
    }
  }
  send({ kind: 'plan', local, remote, digests })
  await comm.connect('127.0.0.1', decodePort)
  const localIds = Uint32Array.from(local)
  const remoteIds = Uint32Array.from(remote)
  const start = process.hrtime.bigint()
  // Layer-wise streaming: every layer is issued without waiting for the previous one.
  await Promise.all(
    Array.from({ length: LAYERS }, (_, layer) =>
      comm.writeCache('127.0.0.1', decodePort, localIds, remoteIds, layer, { tag: TAG }),
    ),
  )
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  send({ kind: 'written', seconds, bytes: LAYERS * 2 * BATCH * BLOCK_BYTES, transport: comm.transport })
  await comm.close()
}

function child(role: 'decode' | 'prefill', args: string[] = []) {
  return fork(__filename, [role, ...args], { stdio: 'inherit' })
}

function once<K extends Message['kind']>(
  proc: ReturnType<typeof fork>,
  kind: K,
): Promise<Extract<Message, { kind: K }>> {
  return new Promise((resolve, reject) => {
    proc.on('message', (message: Message) => {
      if (message.kind === kind) resolve(message as Extract<Message, { kind: K }>)
    })
    proc.on('exit', (code) => reject(new Error(`${kind}: child exited with code ${code} before reporting`)))
  })
}

async function main(): Promise<void> {
  const role = process.argv[2]
  if (role === 'decode') return decodeMain()
  if (role === 'prefill') return prefillMain(Number(process.argv[3]))
  const decode = child('decode')
  const listening = await once(decode, 'listening')
  const prefill = child('prefill', [String(listening.port)])
  prefill.on('message', (message: Message) => {
    if (message.kind === 'plan') decode.send(message)
  })
  const [written, result] = await Promise.all([once(prefill, 'written'), once(decode, 'result')])
  const gbps = written.bytes / written.seconds / 1e9
  console.log(
    `demo: ${LAYERS} layers × ${BATCH} blocks × K+V of ${BLOCK_BYTES / 1024} KiB = ${(written.bytes / 2 ** 20).toFixed(0)} MiB ` +
      `over ${written.transport} in ${(written.seconds * 1e3).toFixed(1)} ms: ${gbps.toFixed(2)} GB/s`,
  )
  console.log(`demo: ${result.ok ? 'OK' : 'FAILED'}: ${result.detail}`)
  process.exitCode = result.ok ? 0 : 1
}

main().catch((error) => {
  console.error(`demo failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`)
  process.exitCode = 1
})
