/**
 * First-line detection: which cells are prose (a cell magic of ours whose body is a prompt).
 * Pure: no JupyterLab import, unit-tested with node's test runner.
 */

/** Cell magics of jupyter_llm whose body is prose, not Python. */
export const PROSE_MAGICS: readonly string[] = ['generate'];

const FIRST_LINE = /^[ \t]*%%([A-Za-z_][\w]*)(?=\s|$)/;

/** The first line of a document (without its line break). */
export function firstLine(text: string): string {
  const end = text.search(/\r?\n/);
  return end < 0 ? text : text.slice(0, end);
}

/** The cell magic named on the first line (`%%generate --max-tokens 5` -> "generate"), or null. */
export function cellMagic(text: string): string | null {
  const match = FIRST_LINE.exec(firstLine(text));
  return match ? match[1] : null;
}

/** Whether the cell's first line is one of our prose cell magics (options allowed). */
export function isProseMagic(text: string, magics: readonly string[] = PROSE_MAGICS): boolean {
  const name = cellMagic(text);
  return name !== null && magics.includes(name);
}

/** The [from, to) range of the magic line in `text` (for its decoration), or null. */
export function magicLineRange(text: string): [number, number] | null {
  return isProseMagic(text) ? [0, firstLine(text).length] : null;
}
