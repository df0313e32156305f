// Runs the web client's script, as served by s1's web port, against an
// in-process cluster of tests/web.rs, in Node with a minimal DOM (dom.js)
// and Node's own WebSocket: log in, chat with TCP clients, follow a route,
// reconnect once its server is crashed. Prints "CRASH s2" and waits for a
// line on stdin when s2 should die; prints "PASS" at the end.
// Environment: WEB1 (s1's web port), S1_CLIENT, S2_CLIENT (client ports).
const net = require("net");
const readline = require("readline");
const webPort = process.env.WEB1;
const s2Client = process.env.S2_CLIENT;
require("./dom.js");
const E = (id) => document.getElementById(id);
global.location = { host: "127.0.0.1:" + webPort, search: "?identity=Webby" };
global.history = { replaceState() {} };
const realFetch = fetch;
global.fetch = (u) => realFetch("http://" + location.host + u);
const stdin = readline.createInterface({ input: process.stdin });
const nextInput = () => new Promise((r) => stdin.once("line", r));
const log = () => E("log").childNodes.map((p) => p.textContent);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, cond, ms = 20000) {
  const end = Date.now() + ms;
  while (!cond()) { if (Date.now() > end) { console.log("LOG:\n" + log().join("\n")); throw new Error("timed out: " + what); } await sleep(50); }
  console.log("ok:", what);
}
function tcp(port, name) {
  const s = net.connect(port, "127.0.0.1");
  const lines = []; let buf = "";
  s.on("data", (d) => { buf += d; let i; while ((i = buf.indexOf("\n")) >= 0) { lines.push(JSON.parse(buf.slice(0, i))); buf = buf.slice(i + 1); } });
  s.lines = lines; s.sendj = (o) => s.write(JSON.stringify(o) + "\n");
  s.sendj({ type: "newidentity", identity: name });
  return s;
}
(async () => {
  const html = await (await fetch("/")).text();
  const script = html.slice(html.indexOf("<script>") + 8, html.indexOf("</script>"));
  eval(script);
  await until("page logged in on s1", () => log().includes("you are in MainHall-s1"));
  await until("members list shows Webby", () => E("memberlist").textContent.includes("Webby"));
  const t = tcp(+process.env.S1_CLIENT, "Tcpy");
  await until("page sees Tcpy arrive", () => log().includes("Tcpy arrived in MainHall-s1"));
  const evil = 'hi <img src=x onerror=alert(1)> "q" 😀';
  t.sendj({ type: "message", content: evil });
  await until("page shows the TCP message as text", () => log().includes("Tcpy: " + evil));
  E("text").value = "from the web 🌍 \"quoted\"";
  E("say").fire("submit");
  await until("TCP client gets the page's message", () => t.lines.some((l) => l.type === "message" && l.identity === "Webby" && l.content === "from the web 🌍 \"quoted\""));
  // A room on s2, made by a TCP client there.
  const u = tcp(+s2Client, "Farah");
  await until("Farah logged in", () => u.lines.some((l) => l.type === "newidentity" && l.approved === "true"));
  u.sendj({ type: "createroom", roomid: "far" });
  await until("Farah created far", () => u.lines.some((l) => l.type === "createroom" && l.approved === "true"));
  let button;
  await until("page lists far", () => { E("text").value = "/list"; E("say").fire("submit"); button = E("roomlist").querySelectorAll("button").find((b) => b.dataset.room === "far"); return !!button; });
  button.fire("click");
  await until("page followed the route to s2", () => log().includes("now on server s2"));
  await until("page is in far", () => log().includes("you moved from MainHall-s1 to far") && E("roomname").textContent === "far");
  await until("Farah sees Webby arrive", () => u.lines.some((l) => l.type === "roomchange" && l.identity === "Webby" && l.roomid === "far"));
  E("text").value = "hello far"; E("say").fire("submit");
  await until("Farah gets it", () => u.lines.some((l) => l.type === "message" && l.content === "hello far"));
  console.log("CRASH s2");
  await nextInput();
  await until("page says it lost s2", () => log().some((l) => l.startsWith("lost the connection to server s2")));
  const lostAt = log().findIndex((l) => l.startsWith("lost the connection to server s2"));
  await until("page reconnected elsewhere", () => log().slice(lostAt).some((l) => /^you are in MainHall-s[13]$/.test(l)), 20000);
  await until("members shown again", () => E("memberlist").textContent.includes("Webby"));
  // It tries the server it came from first (s2 is known down).
  if (E("roomname").textContent !== "MainHall-s1") throw new Error("reconnected to " + E("roomname").textContent);
  const t2 = tcp(+process.env.S1_CLIENT, "Tcpz");
  await until("page sees Tcpz arrive", () => log().includes("Tcpz arrived in MainHall-s1"));
  t2.sendj({ type: "message", content: "still there?" });
  await until("page gets messages after reconnecting", () => log().includes("Tcpz: still there?"));
  console.log("LOG:\n" + log().join("\n"));
  console.log("PASS");
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
