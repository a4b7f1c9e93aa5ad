/** `kvtransfer serve`: runs the sidecar until SIGINT or SIGTERM. */
import { parseArgs } from 'node:util'
import { UsageError, integer } from '../cli-args'
import { Sidecar, defaultSocketPath } from './serve'

export const SERVE_HELP = `Usage: kvtransfer serve [options]

The sidecar: PyTorch workers on this host (vLLM, SGLang, FastDeploy) attach their KV caches
over a Unix domain socket and get a communicator each (clients/python; docs/sidecar.md).

  --socket PATH        the socket (default: KVTRANSFER_SOCKET, else
                       $XDG_RUNTIME_DIR/kvtransfer.sock, else /tmp/kvtransfer-<uid>.sock)
  --mode OCTAL         the socket file's permission bits (default 600)
  --allow-uid UID      also admit this user id (repeatable; the sidecar's own uid and root
                       are always admitted)
  --metrics-port N     serve Prometheus metrics at http://HOST:N/metrics (0: any free port)
  --metrics-host HOST  the metrics address (default 127.0.0.1)
  --warm-grace-ms N    keep the communicator of a worker that attached with a slot this long
                       after it ends, for its restarted successor (default 30000; 0: off)

Stops on SIGINT or SIGTERM: workers are detached and the socket file is removed.
Exit status: 0 after a signal; 2 on a usage or setup error.
`

export async function runServe(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      socket: { type: 'string' },
      mode: { type: 'string' },
      'allow-uid': { type: 'string', multiple: true },
      'metrics-port': { type: 'string' },
      'metrics-host': { type: 'string' },
      'warm-grace-ms': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    process.stdout.write(SERVE_HELP)
    return 0
  }
  const modeText = values.mode ?? '600'
  if (!/^[0-7]{1,4}$/.test(modeText))
    throw new UsageError(`--mode expects octal permission bits (e.g. 660), got '${modeText}'`)
  const sidecar = await Sidecar.start({
    socket: values.socket ?? defaultSocketPath(),
    mode: parseInt(modeText, 8),
    allowUids: (values['allow-uid'] ?? []).map((uid) => integer('allow-uid', uid, 0, 0)),
    metricsPort:
      values['metrics-port'] === undefined ? undefined : integer('metrics-port', values['metrics-port'], 0, 0),
    metricsHost: values['metrics-host'],
    warmGraceMs:
      values['warm-grace-ms'] === undefined ? undefined : integer('warm-grace-ms', values['warm-grace-ms'], 0, 0),
  })
  const metrics =
    sidecar.metricsPort === undefined
      ? ''
      : `; metrics on http://${values['metrics-host'] ?? '127.0.0.1'}:${sidecar.metricsPort}/metrics`
  process.stdout.write(`kvtransfer sidecar listening on ${sidecar.socket} (mode ${modeText})${metrics}\n`)
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGINT', resolve)
    process.once('SIGTERM', resolve)
  })
  process.stdout.write(`kvtransfer sidecar: ${signal}, detaching ${sidecar.workerCount} worker(s)\n`)
  await sidecar.close()
  return 0
}
