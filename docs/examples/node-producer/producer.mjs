// Send one writing session to the writing-sessions worker from Node.js, with no Celery library:
// build the Celery protocol v2 message and LPUSH it onto the "celery" list in Redis.
// Usage: CELERY_BROKER_URL=redis://127.0.0.1:6379/0 node producer.mjs "Topic" "Content"
// Prints the task id and the writing-session id; with --wait, polls the Redis result backend.
import { randomUUID } from "node:crypto";
import { createClient } from "redis";

export function celeryMessage(task, args, kwargs = {}) {
  const taskId = randomUUID();
  // The body is the JSON array [args, kwargs, embed], base64-encoded (properties.body_encoding).
  const body = Buffer.from(
    JSON.stringify([args, kwargs, { callbacks: null, errbacks: null, chain: null, chord: null }]),
    "utf8",
  ).toString("base64");
  const message = {
    body,
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "js",
      task,
      id: taskId,
      root_id: taskId,
      parent_id: null,
      group: null,
      retries: 0,
      eta: null,
      expires: null,
      timelimit: [null, null],
      argsrepr: JSON.stringify(args).slice(0, 200),
      kwargsrepr: "{}",
      origin: "node-producer",
    },
    properties: {
      correlation_id: taskId,
      reply_to: "",
      delivery_mode: 2,
      delivery_info: { exchange: "", routing_key: "celery" },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: randomUUID(),
    },
  };
  return { taskId, message: JSON.stringify(message) };
}

async function main() {
  const [topic = "From Node.js", content = "", ...flags] = process.argv.slice(2);
  const wait = flags.includes("--wait");
  const client = createClient({ url: process.env.CELERY_BROKER_URL ?? "redis://127.0.0.1:6379/0" });
  await client.connect();
  const session = { id: randomUUID(), topic, content, started_at: new Date().toISOString() };
  const { taskId, message } = celeryMessage("writing_sessions.save", [session]);
  await client.lPush("celery", message);
  console.log(JSON.stringify({ task_id: taskId, id: session.id }));
  if (wait) {
    // With CELERY_RESULT_BACKEND=redis://..., the outcome appears under celery-task-meta-<task id>.
    const backend = createClient({ url: process.env.CELERY_RESULT_BACKEND ?? process.env.CELERY_BROKER_URL });
    await backend.connect();
    const deadline = Date.now() + 30_000;
    let meta = null;
    while (!meta && Date.now() < deadline) {
      meta = await backend.get(`celery-task-meta-${taskId}`);
      if (!meta) await new Promise((resolve) => setTimeout(resolve, 100));
    }
    await backend.quit();
    if (!meta) throw new Error(`no outcome for ${taskId} within 30 s`);
    const { status, result } = JSON.parse(meta);
    console.log(JSON.stringify({ status, result }));
  }
  await client.quit();
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((error) => {
    console.error(error.message);
    process.exit(1);
  });
}
