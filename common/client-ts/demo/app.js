// The demo page, built on the SDK (./sdk is common/client-ts/dist, copied by `npm run build`).
// It uses the cluster's dev auth (`?user=`): run it on a local cluster only.
import { ChatClient } from "./sdk/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let chat;
let room;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
}

/** A message as a list item; the SDK hands each one over once, so none is checked here. */
function item(m) {
  const li = document.createElement("li");
  li.dataset.id = m.id;
  li.dataset.cid = `${m.from}/${m.cid}`;
  const who = document.createElement("b");
  who.textContent = m.from;
  li.append(who, document.createTextNode(m.body));
  return li;
}

function append(m) {
  const list = $("messages");
  list.append(item(m));
  list.scrollTop = list.scrollHeight;
}

function setPresence(user, here) {
  const list = $("presence");
  const el = list.querySelector(`li[data-user="${CSS.escape(user)}"]`);
  if (here && !el) {
    const li = document.createElement("li");
    li.dataset.user = user;
    li.textContent = user;
    list.append(li);
  } else if (!here && el) {
    el.remove();
  }
}

async function start(roomName, user) {
  room = roomName;
  chat = new ChatClient({ url: location.origin, user });
  chat.on("state", (s) => {
    $("state").textContent = s;
    log(`connection ${s}`);
  });
  chat.on("message", append);
  chat.on("presence", (p) => {
    setPresence(p.user, p.event === "join");
    log(`${p.user} ${p.event === "join" ? "joined" : "left"}`);
  });
  chat.on("resumed", (r) => {
    const el = $("resumed");
    el.dataset.count = String(Number(el.dataset.count) + 1);
    el.dataset.at = String(Date.now());
    el.textContent = `resumed after ${r.downMs} ms`;
    log(`resumed ${r.rooms.join(", ")} after ${r.downMs} ms`);
  });
  chat.on("error", (e) => log(`error ${e.code}${e.closeCode ? ` (close ${e.closeCode})` : ""}`));
  $("login").hidden = true;
  $("chat").hidden = false;
  setPresence(`${user} (you)`, true);
  // Recent history first, then live messages from where it ends.
  const page = await chat.history(room, { limit: 50 });
  page.messages.forEach(append);
  $("older").disabled = !page.hasMore;
  const last = page.messages.at(-1)?.id;
  await chat.join(room, last ? { since: last } : {});
  document.body.dataset.ready = "true";
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  void start($("room").value, $("user").value);
});

$("compose").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = $("body").value;
  $("body").value = "";
  try {
    await chat.send(room, body);
  } catch (e) {
    log(`not sent: ${e.message}`);
  }
});

$("older").addEventListener("click", async () => {
  const first = $("messages").querySelector("li[data-id]")?.dataset.id;
  const page = await chat.history(room, first ? { before: first, limit: 50 } : { limit: 50 });
  $("messages").prepend(...page.messages.map(item));
  $("older").disabled = !page.hasMore;
});

if (params.get("room") && params.get("user")) {
  $("room").value = params.get("room");
  $("user").value = params.get("user");
  void start(params.get("room"), params.get("user"));
}
