'use strict'
// One node of fedfleet's aedes cluster (started by tools/infra/aedes.py, one process per node).
//
//   node node.js MODULES_DIR MQTT_PORT REDIS_PORT NODE_ID
//
// MODULES_DIR holds node_modules with aedes, aedes-persistence-redis and mqemitter-redis (the versions pinned
// in package.json next to this file). Every node shares one Redis: mqemitter-redis carries messages between
// nodes, aedes-persistence-redis keeps sessions, subscriptions, retained messages, wills and queued QoS 1
// packets, so a client may reconnect to any node. Listens on 127.0.0.1:MQTT_PORT only and prints
// "listening PORT" once it accepts connections. Exits on SIGTERM, SIGINT or when its stdin closes (the
// launcher holds the other end: a launcher that dies, even by SIGKILL, takes its nodes with it).
const net = require('node:net')
const path = require('node:path')
const { createRequire } = require('node:module')
const { pathToFileURL } = require('node:url')

async function main () {
  const [modules, mqttPort, redisPort, id] = process.argv.slice(2)
  if (!modules || !(Number(mqttPort) > 0) || !(Number(redisPort) > 0) || !id) {
    throw new Error('usage: node node.js MODULES_DIR MQTT_PORT REDIS_PORT NODE_ID')
  }
  const req = createRequire(path.join(path.resolve(modules), 'package.json'))
  const { Aedes } = await import(pathToFileURL(req.resolve('aedes')).href)
  const redis = { host: '127.0.0.1', port: Number(redisPort), family: 4 }
  const mq = req('mqemitter-redis')({ ...redis })
  const persistence = req('aedes-persistence-redis')({ ...redis })
  const broker = await Aedes.createBroker({ id, mq, persistence, heartbeatInterval: 1000 })
  const server = net.createServer({ noDelay: true }, broker.handle)
  let logged = 0 // the first client errors go to the node's log (stderr), for diagnosis
  const note = (what) => (client, err) => {
    if (logged++ < 200) process.stderr.write(`aedes node ${id}: ${what} ${client ? client.id : '-'}: ${err.message}\n`)
  }
  broker.on('clientError', note('client error'))
  broker.on('connectionError', note('connection error'))

  let stopping = false
  function stop (code) {
    if (stopping) return
    stopping = true
    setTimeout(() => process.exit(code), 3000).unref() // a stuck close must not keep the node alive
    server.close()
    broker.close(() => {
      Promise.resolve(persistence.destroy && persistence.destroy()).finally(() => process.exit(code))
    })
  }
  process.on('SIGTERM', () => stop(0))
  process.on('SIGINT', () => stop(0))
  process.stdin.on('end', () => stop(0))
  process.stdin.on('error', () => stop(0))
  process.stdin.resume()
  server.on('error', (err) => {
    process.stderr.write(`aedes node ${id}: ${err.message}\n`)
    process.exit(1)
  })
  server.listen({ port: Number(mqttPort), host: '127.0.0.1', backlog: 4096 }, () => {
    process.stdout.write(`listening ${mqttPort}\n`)
  })
}

main().catch((err) => {
  process.stderr.write(`aedes node: ${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
})
