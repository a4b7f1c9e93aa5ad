/** The sidecar's optional HTTP endpoint: `GET /metrics` answers Prometheus text. */
import * as http from 'node:http'
import type { AddressInfo } from 'node:net'
import { KvTransferError } from '../errors'

export class MetricsServer {
  private constructor(private readonly server: http.Server) {}

  /** Listens on `host:port` and answers `GET /metrics` with `render()`. */
  static start(host: string, port: number, render: () => string): Promise<MetricsServer> {
    const server = http.createServer((request, response) => {
      if (request.method !== 'GET' || (request.url ?? '/').split('?')[0] !== '/metrics') {
        response.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics is served\n')
        return
      }
      let body: string
      try {
        body = render()
      } catch (error) {
        response.writeHead(500, { 'content-type': 'text/plain' }).end(`${String(error)}\n`)
        return
      }
      response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(body)
    })
    return new Promise((resolve, reject) => {
      server.once('error', (error) =>
        reject(
          new KvTransferError(
            'ERR_IO',
            `cannot serve metrics on ${host}:${port}: ${error.message} (is the port in use?)`,
          ),
        ),
      )
      server.listen(port, host, () => resolve(new MetricsServer(server)))
    })
  }

  /** The bound port. */
  get port(): number {
    return (this.server.address() as AddressInfo).port
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve())
      this.server.closeAllConnections()
    })
  }
}
