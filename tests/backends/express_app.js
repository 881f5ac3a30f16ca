// A notes API written the way Express's guide writes one, for cachegate's tests: an
// `express.Router()` mounted at /notes, JSON bodies, ETags (Express's default), and Node's HTTP
// server with its default 5 s keep-alive, which it announces in `Keep-Alive: timeout=5`.
// `GET /__stats` counts the requests that reached the app. Nothing here knows about the gateway.
//
// Run: node express_app.js --port 8000

const express = require("express");

const app = express();
app.use(express.json());

const stats = { requests: 0 };
app.use((req, res, next) => {
  if (req.path !== "/__stats") stats.requests += 1;
  next();
});
app.get("/__stats", (req, res) => res.json(stats));

const notes = new Map([
  [1, { id: 1, text: "buy tea", version: 1 }],
  [2, { id: 2, text: "call home", version: 1 }],
]);

const router = express.Router();

router.get("/", (req, res) => res.json([...notes.values()]));

router.post("/", (req, res) => {
  if (typeof req.body?.text !== "string") {
    return res.status(400).json({ error: "text is required" });
  }
  const id = Math.max(0, ...notes.keys()) + 1;
  const note = { id, text: req.body.text, version: 1 };
  notes.set(id, note);
  res.status(201).location(`/notes/${id}`).json(note);
});

router.get("/:id", (req, res) => {
  const note = notes.get(Number(req.params.id));
  if (!note) return res.status(404).json({ error: "not found" });
  res.json(note);
});

router.put("/:id", (req, res) => {
  const id = Number(req.params.id);
  const note = notes.get(id);
  if (!note) return res.status(404).json({ error: "not found" });
  const updated = { ...note, text: req.body?.text ?? note.text, version: note.version + 1 };
  notes.set(id, updated);
  res.json(updated);
});

router.delete("/:id", (req, res) => {
  if (!notes.delete(Number(req.params.id))) return res.status(404).json({ error: "not found" });
  res.status(204).end();
});

app.use("/notes", router);

const at = process.argv.indexOf("--port");
const port = at > 0 ? Number(process.argv[at + 1]) : 8000;
app.listen(port, "127.0.0.1");
