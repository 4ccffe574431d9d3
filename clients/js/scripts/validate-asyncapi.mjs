// Validate an AsyncAPI document with the official parser: node validate-asyncapi.mjs FILE
// Prints the diagnostics; exits 1 when any is an error.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const text = await readFile(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(text);
const errors = diagnostics.filter((d) => d.severity === 0);
for (const d of diagnostics) console.log(`${d.severity} ${d.code}: ${d.message} at ${d.path.join("/")}`);
if (!document || errors.length) process.exit(1);
console.log(`ok: ${document.channels().length} channels, ${document.messages().length} messages`);
