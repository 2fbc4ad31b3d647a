// Entry point bundled by esbuild into kloset_blocks/web/static/vendor/editor.js: CodeMirror 6 with
// SQL highlighting, exposed as window.KlosetEditor.create(parent, {label, onRun}).
// The editor's content element gets the accessible name `label` (the page uses "SQL").
import { EditorView, basicSetup } from "codemirror";
import { keymap } from "@codemirror/view";
import { sql, PostgreSQL } from "@codemirror/lang-sql";

function create(parent, { label = "SQL", doc = "", onRun = () => {} } = {}) {
  const run = () => { onRun(); return true; };
  const view = new EditorView({
    doc,
    parent,
    extensions: [
      keymap.of([{ key: "Mod-Enter", run }]),
      basicSetup,
      sql({ dialect: PostgreSQL }),
      EditorView.contentAttributes.of({ "aria-label": label }),
      EditorView.lineWrapping,
    ],
  });
  return {
    get: () => view.state.doc.toString(),
    set: (text) => view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } }),
    focus: () => view.focus(),
  };
}

window.KlosetEditor = { create };
