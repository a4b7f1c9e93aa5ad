/**
 * The cost of `checksum: 'crc32c'` and `delivery: 'acked'` on TCP, side by side in one run:
 * a prefill and a decode communicator of this process over loopback, tagged calls of one
 * block (K and V) each, `depth` in flight; rounds of each case interleaved, so the noise of
 * a shared machine falls on every case alike. Run: `node lib/bench/integrity.js [blockKiB]`.
 */
import { communicatorOnHostRegions } from '../setup'
import type { WriteOptions } from '../options'

const LAYERS = 1
const BLOCKS = 64

async function main(): Promise<void> {
  const blockBytes = Number(process.argv[2] ?? 64) * 1024
  const rounds = Number(process.argv[3] ?? 12)
  const callsPerRound = Number(process.argv[4] ?? 2000)
  const depth = 16
  const setup = (role: 'prefill' | 'decode') =>
    communicatorOnHostRegions({
      role,
      layers: LAYERS,
      fill: 'random',
      blockNumber: BLOCKS,
      blockBytes,
      transport: 'tcp',
      host: '127.0.0.1',
      authToken: '',
      maxPendingArrivals: 0,
    }).comm
  const decode = setup('decode')
  const prefill = setup('prefill')
  await decode.ready
  const peer = await prefill.connect('127.0.0.1', decode.port).then(() => prefill.peer('127.0.0.1', decode.port))
  const cases: Array<[string, WriteOptions]> = [
    ['tagged', { tag: 'b' }],
    ['tagged + crc32c', { tag: 'b', checksum: 'crc32c' }],
    ['tagged + acked', { tag: 'b', delivery: 'acked' }],
  ]
  const gbps = new Map<string, number[]>(cases.map(([name]) => [name, []]))
  for (let round = 0; round < rounds; round++) {
    for (const [name, options] of cases) {
      const start = process.hrtime.bigint()
      let issued = 0
      const lane = async () => {
        while (issued < callsPerRound) {
          const block = issued++ % BLOCKS
          await prefill.writeCache(peer, [block], [block], 0, options)
        }
      }
      await Promise.all(Array.from({ length: depth }, lane))
      const seconds = Number(process.hrtime.bigint() - start) / 1e9
      if (round > 0) gbps.get(name)!.push((callsPerRound * 2 * blockBytes) / seconds / 1e9)
    }
  }
  const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]
  const base = median(gbps.get('tagged')!)
  for (const [name] of cases) {
    const m = median(gbps.get(name)!)
    console.log(
      `${name.padEnd(18)} ${m.toFixed(3)} GB/s median of ${rounds - 1} rounds (${((m / base - 1) * 100).toFixed(1)} % vs tagged)`,
    )
  }
  await prefill.close()
  await decode.close()
}

void main()
