// Compiled (not run) by `npm run test:types`: the client's generic typing, as an app
// with generated channel types would use it. `@ts-expect-error` lines must fail to
// compile, so a regression that loosens the types breaks the build.
import { Client, type DataOf, type Item, type Publication, type Subscription } from "../../dist/tidings.js";

interface OrderUpdate {
  id: number;
  status: "paid" | "sent";
}
interface ChatLine {
  name: string;
  text: string;
}
/** what `tidings typescript --app ...` would generate for two typed channels */
interface Channels {
  "orders/+": OrderUpdate;
  "chat/#": ChatLine;
}

type Assert<T extends true> = T;
type Equal<A, B> = (<X>() => X extends A ? 1 : 2) extends <X>() => X extends B ? 1 : 2 ? true : false;
export type Checks = [
  Assert<Equal<DataOf<Channels, "orders/+">, OrderUpdate>>,
  Assert<Equal<DataOf<Channels, "orders/17">, OrderUpdate>>,
  Assert<Equal<DataOf<Channels, "chat/lobby/thread">, ChatLine>>,
  Assert<Equal<DataOf<Channels, "other/x">, unknown>>,
  Assert<Equal<DataOf<Record<string, unknown>, "anything">, unknown>>,
];

export async function typed(client: Client<Channels>): Promise<void> {
  const orders = await client.subscribe("orders/+");
  for await (const pub of orders) {
    const status: "paid" | "sent" = pub.data.status;
    // @ts-expect-error: not a field of OrderUpdate
    pub.data.missing;
    void status;
  }
  await client.publish("orders/1", { id: 1, status: "paid" });
  // @ts-expect-error: wrong shape for an orders channel
  await client.publish("orders/1", { id: "1" });
  const page = await client.history("chat/lobby");
  const text: string | undefined = page.publications[0]?.data.text;
  void text;
}

export async function explicit(client: Client): Promise<void> {
  const sub: Subscription<OrderUpdate> = await client.subscribe<OrderUpdate>("orders/+", {
    onSubscribed: (info) => void info.recovered,
  });
  sub.on("publication", (pub: Publication<OrderUpdate>) => void pub.data.id);
  const untyped = await client.subscribe("x/#");
  for await (const pub of untyped) {
    // @ts-expect-error: data is unknown without a type
    pub.data.id;
  }
  await client.pull<{ job: number }>("jobs", { max: 2, onItem: (item: Item<{ job: number }>) => void item.ack() });
  for await (const message of client.messages<ChatLine>()) void message.data.text;
}
