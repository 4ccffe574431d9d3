"""``tidings asyncapi --app`` and ``tidings typescript --app``: an app's typed
channels documented beside the wire protocol, checked by the AsyncAPI parser and
compiled by ``tsc --strict`` together with the JavaScript client's types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.test_js_client import CLIENT, built  # noqa: F401 - the fixture

APP = '''
from pydantic import BaseModel
from tidings import Hub

class Line(BaseModel):
    sku: str
    qty: int = 1

class OrderUpdate(BaseModel):
    order_id: int
    status: str
    lines: list[Line] = []

class Job(BaseModel):
    task: str
    retries: int = 0

class Notice(BaseModel):
    text: str
    level: str = "info"

hub = Hub()
hub.channel("orders/+", OrderUpdate)
hub.channel("sensors/#", list[float])
hub.queue_type("jobs/+", Job)
hub.queue_type("batch", list[int])
hub.message_type(Notice)
'''

CONSUMER = '''
import { Client, type Item, type Message } from "CLIENT/dist/tidings.js";
import type { ChannelTypes, MessageData, OrderUpdate, QueueTypes } from "./channels.js";

export function work(item: Item<QueueTypes["jobs/+"]>, batch: Item<QueueTypes["batch"]>,
                     message: Message<MessageData>): void {
  const task: string = item.data.task;
  const first: number | undefined = batch.data[0];
  const text: string = message.data.text;
  // @ts-expect-error: not a field of Job
  item.data.owner;
  // @ts-expect-error: a Notice has no count
  message.data.count;
  void task; void first; void text;
}

export async function use(client: Client<ChannelTypes>): Promise<void> {
  const orders = await client.subscribe("orders/+");
  for await (const pub of orders) {
    const id: number = pub.data.order_id;
    const sku: string | undefined = pub.data.lines?.[0]?.sku;
    // @ts-expect-error: not a field of OrderUpdate
    pub.data.price;
    void id; void sku;
  }
  const update: OrderUpdate = { order_id: 1, status: "paid" };
  await client.publish("orders/1", update);
  // @ts-expect-error: sensors carry numbers
  await client.publish("sensors/a", ["hot"]);
}
'''


def cli(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "tidings.server.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "shopapp.py").write_text(APP)
    return tmp_path


def test_asyncapi_has_the_app_channels_and_parses(app: Path, built: str) -> None:  # noqa: F811
    text = cli(app, "asyncapi", "--app", "shopapp:hub")
    doc = json.loads(text)
    assert doc["channels"]["app1"]["address"] == "orders/+"
    assert doc["channels"]["app2"]["address"] == "sensors/#"
    order = doc["components"]["schemas"]["OrderUpdate"]
    assert order["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/Line"}
    assert doc["channels"]["queue1"]["address"] == "jobs/+"
    assert doc["channels"]["queue2"]["address"] == "batch"
    item = doc["components"]["messages"]["queue1_item"]
    assert item["payload"] == {"$ref": "#/components/schemas/Job"}
    assert doc["components"]["schemas"]["Queue2Item"]["items"] == {"type": "integer"}
    assert doc["channels"]["messages"]["address"] is None
    notice = doc["components"]["schemas"]["Notice"]
    assert notice["properties"]["text"] == {"title": "Text", "type": "string"}
    assert "native" in doc["channels"]  # the wire protocol is still there
    (app / "doc.json").write_text(text)
    check = subprocess.run(["node", str(CLIENT / "scripts" / "validate-asyncapi.mjs"),
                            str(app / "doc.json")], cwd=CLIENT, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok: 6 channels" in check.stdout


def test_typescript_compiles_strict_with_the_client(app: Path, built: str) -> None:  # noqa: F811
    declarations = cli(app, "typescript", "--app", "shopapp:hub")
    assert 'export interface ChannelTypes {\n  "orders/+": OrderUpdate;' in declarations
    assert ('export interface QueueTypes {\n  "jobs/+": Job;\n  "batch": Queue2Item;\n}'
            in declarations)
    assert "export type MessageData = Notice;" in declarations
    (app / "channels.ts").write_text(declarations)
    (app / "consumer.ts").write_text(textwrap.dedent(CONSUMER).replace("CLIENT", str(CLIENT)))
    (app / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"target": "ES2022", "module": "ES2022",
                            "moduleResolution": "Bundler", "lib": ["ES2022", "DOM"],
                            "types": [], "strict": True, "noEmit": True},
        "files": ["channels.ts", "consumer.ts"]}))
    tsc = subprocess.run([str(CLIENT / "node_modules" / ".bin" / "tsc"), "-p",
                          str(app / "tsconfig.json")], capture_output=True, text=True,
                         timeout=120)
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr


def test_app_must_name_a_hub(app: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(app)}
    done = subprocess.run([sys.executable, "-m", "tidings.server.cli", "asyncapi", "--app",
                           "shopapp:Line"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not a tidings Hub" in done.stderr
