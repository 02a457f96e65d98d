// The Node side of bench/iprules_vs_node.sh: the same rule file and queries
// on net.BlockList. Prints one key=value line like `rulebench run`.
// usage: node blocklist.mjs RULES QUERIES ROUNDS
import { readFileSync } from 'node:fs';
import { BlockList, isIPv6 } from 'node:net';

const [rulesPath, queriesPath, roundsArg] = process.argv.slice(2);
const rounds = Number(roundsArg ?? 3);
const fam = (a) => (isIPv6(a) ? 'ipv6' : 'ipv4');
const rules = readFileSync(rulesPath, 'utf8').split('\n').filter(Boolean);
const queries = readFileSync(queriesPath, 'utf8').split('\n').filter(Boolean)
  .map((q) => [q, fam(q)]);

const t0 = process.hrtime.bigint();
const list = new BlockList();
for (const r of rules) {
  if (r.includes('/')) {
    const [a, p] = r.split('/');
    list.addSubnet(a, Number(p), fam(a));
  } else if (r.includes('-')) {
    const [a, b] = r.split('-');
    list.addRange(a, b, fam(a));
  } else {
    list.addAddress(r, fam(r));
  }
}
const buildMs = Number(process.hrtime.bigint() - t0) / 1e6;

let hits = 0;
for (const [q, f] of queries) if (list.check(q, f)) hits++;

const per = [];
for (let i = 0; i < rounds; i++) {
  const s = process.hrtime.bigint();
  let n = 0;
  do {
    for (const [q, f] of queries) list.check(q, f);
    n += queries.length;
  } while (Number(process.hrtime.bigint() - s) < 50e6);
  per.push(Number(process.hrtime.bigint() - s) / n);
}
per.sort((a, b) => a - b);
console.log(`rules=${rules.length} build_ms=${buildMs.toFixed(3)} ns_per_check=${per[per.length >> 1].toFixed(1)} hits=${hits}`);
