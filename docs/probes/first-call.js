// The first call of a prepared request, under variations of what came before it
// (docs/performance.md, "Call overhead and prepared calls"). Run against a built package:
//   MODE=base,n1,n8,n30,timer,busy node docs/probes/first-call.js .
// For each mode: 300 requests (after 20 of warm-up) of 60 prepared layer calls (1538
// scattered ids, 1-byte blocks, TCP to a forked agent), printing the median µs of call 0
// and of calls 1-7 and 8-59 (hrtime around each call).
//   base     the request starts right after the previous one settled (as in bench --overhead)
//   nN       requests of N calls instead of 60 (how call 0 grows with the previous request)
//   timer    a 1 ms timer between requests
//   spin     a 200 µs busy loop on the JS thread before call 0
//   isconn   one cheap native call (isConnected) before call 0
//   busy     the JS thread never sleeps while a request runs (setImmediate loop)
//   sleep5   5 ms timer, then the completions in one go
// NODEADLINE=1: calls without a deadline (timeoutMs 0). ROUNDS=n: requests per mode.
'use strict'
const path = require('node:path')
const { randomFillSync } = require('node:crypto')
const pkg = path.resolve(process.argv[2] || '.')
const { RDMACommunicator } = require(pkg + '/lib/index')
const { startAgent } = require(pkg + '/lib/bench/driver')
const { permutation } = require(pkg + '/lib/bench/common')

const median = (a) => a.slice().sort((x, y) => x - y)[a.length >> 1]
const options = process.env.NODEADLINE ? { timeoutMs: 0 } : {}
const tick = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const immediate = () => new Promise((resolve) => setImmediate(resolve))

async function main() {
  const batch = 1538
  const maxLayers = 60
  const rounds = Number(process.env.ROUNDS || 300)
  const agent = await startAgent({ transport: 'tcp' })
  await agent.channel.call({ op: 'init', layers: maxLayers, blocks: batch, maxBlockBytes: 1 })
  const setup = await agent.channel.call({ op: 'setup', blockBytes: 1, transport: 'tcp' })
  const cache = () => Array.from({ length: maxLayers }, () => randomFillSync(Buffer.alloc(batch)))
  const comm = new RDMACommunicator({
    role: 'prefill',
    gpuIdx: 0,
    port: 0,
    localKeyCache: cache(),
    localValueCache: cache(),
    blockNumber: batch,
    blockBytes: 1,
    transport: 'tcp',
  })
  const host = agent.host
  const port = setup.port
  await comm.connect(host, port)
  const prepared = comm.prepareBlocks(host, port, permutation(batch), permutation(batch))
  for (const mode of (process.env.MODE || 'base').split(',')) {
    const layers = /^n\d+$/.test(mode) ? Number(mode.slice(1)) : maxLayers
    const first = []
    const early = []
    const later = []
    const t = new Array(layers + 1)
    for (let round = 0; round < rounds + 20; round++) {
      if (mode === 'timer') await tick(1)
      if (mode === 'spin') {
        const until = process.hrtime.bigint() + 200_000n
        while (process.hrtime.bigint() < until);
      }
      if (mode === 'isconn') comm.isConnected(host, port)
      const pending = new Array(layers)
      for (let layer = 0; layer < layers; layer++) {
        t[layer] = process.hrtime.bigint()
        pending[layer] = comm.writeCache(host, port, prepared, layer, options)
      }
      t[layers] = process.hrtime.bigint()
      const all = Promise.all(pending)
      if (mode === 'busy') {
        let settled = false
        all.then(() => (settled = true))
        while (!settled) await immediate()
      } else if (mode === 'sleep5') await tick(5)
      await all
      if (round < 20) continue
      first.push(Number(t[1] - t[0]) / 1e3)
      for (let layer = 1; layer < layers; layer++) {
        ;(layer < 8 ? early : later).push(Number(t[layer + 1] - t[layer]) / 1e3)
      }
    }
    const show = (a) => (a.length ? median(a).toFixed(2) : '-')
    console.log(`${mode.padEnd(7)} call 0 ${show(first)} µs | calls 1-7 ${show(early)} | calls 8-59 ${show(later)}`)
  }
  await comm.close()
  await agent.channel.call({ op: 'close' }).catch(() => undefined)
  agent.channel.socket.end()
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error)
    process.exit(1)
  },
)
