/**
 * %%generate cells are edited as Markdown (prompt Markdown: prose.ts): a CodeMirror 6 extension
 * with a Compartment reconfigured from the first line (as jupysql-plugin does for %%sql), and a
 * line decoration that keeps the magic line visibly a magic.
 */
import { LanguageSupport } from '@codemirror/language';
import { Compartment, EditorState, Extension, Prec, Text } from '@codemirror/state';
import { Decoration, DecorationSet, EditorView, ViewPlugin, ViewUpdate } from '@codemirror/view';
import { isProseMagic } from './detect';
import { promptMarkdown } from './prose';

const prose = new Compartment();
let proseLanguage: Extension | null = null; // Markdown, once JupyterLab's language registry loaded it
const views = new Set<EditorView>();
const magicLine = Decoration.line({ class: 'jllm-magic-line', attributes: { 'data-jllm-magic': 'true' } });

function wantsProse(doc: Text): boolean {
  return proseLanguage !== null && isProseMagic(doc.line(1).text);
}

function isProse(state: EditorState): boolean {
  return proseLanguage !== null && prose.get(state) === proseLanguage;
}

function sync(view: EditorView): void {
  const want = wantsProse(view.state.doc);
  if (want !== isProse(view.state)) {
    view.dispatch({ effects: prose.reconfigure(want ? proseLanguage! : []) });
  }
}

/** Switch the language in the same transaction as the edit of the first line. */
const switcher = EditorState.transactionExtender.of(tr => {
  if (!tr.docChanged || proseLanguage === null) {
    return null;
  }
  const want = wantsProse(tr.newDoc);
  if (want === isProse(tr.startState)) {
    return null;
  }
  return { effects: prose.reconfigure(want ? proseLanguage : []) };
});

class MagicLinePlugin {
  decorations: DecorationSet;

  constructor(readonly view: EditorView) {
    views.add(view);
    this.decorations = this.build(view.state.doc);
    // The document is set after the editor is created: check once it is in place.
    setTimeout(() => views.has(view) && sync(view), 0);
  }

  update(update: ViewUpdate): void {
    if (update.docChanged) {
      this.decorations = this.build(update.state.doc);
    }
  }

  destroy(): void {
    views.delete(this.view);
  }

  private build(doc: Text): DecorationSet {
    return isProseMagic(doc.line(1).text) ? Decoration.set([magicLine.range(0)]) : Decoration.none;
  }
}

/** The editor extension (one instance shared by every editor). */
export function proseMagicExtension(): Extension {
  return [prose.of([]), switcher, ViewPlugin.fromClass(MagicLinePlugin, { decorations: p => p.decorations })];
}

/** Give the Markdown language support (from JupyterLab's language registry); re-checks open editors. */
export function setProseLanguage(support: LanguageSupport): void {
  // Highest precedence: the language facet takes the first value, ahead of the cell's Python.
  proseLanguage = Prec.highest(promptMarkdown(support));
  for (const view of views) {
    sync(view);
  }
}
