import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { markdown } from '@codemirror/lang-markdown';
import { cellMagic, firstLine, isProseMagic, magicLineRange } from '../src/detect';
import { promptMarkdown } from '../src/prose';

test('first line', () => {
  assert.equal(firstLine('%%generate\nhello'), '%%generate');
  assert.equal(firstLine('%%generate\r\nhello'), '%%generate');
  assert.equal(firstLine('only line'), 'only line');
  assert.equal(firstLine(''), '');
});

test('%%generate with and without options is prose', () => {
  assert.ok(isProseMagic('%%generate\nWhat\'s {x}?'));
  assert.ok(isProseMagic('%%generate --max-tokens 20 --temperature 0\nIt\'s'));
  assert.ok(isProseMagic('%%generate'));
  assert.ok(isProseMagic('  %%generate -o out\n'));
  assert.ok(isProseMagic('%%generate\t--chat\nhi'));
});

test('other cells stay Python', () => {
  assert.ok(!isProseMagic("x = 'it's'"));
  assert.ok(!isProseMagic('%%generated\nhi'));  // another magic name
  assert.ok(!isProseMagic('%%time\n%%generate\nhi'));  // only the first line counts
  assert.ok(!isProseMagic('# %%generate\nhi'));
  assert.ok(!isProseMagic('%generate\nhi'));  // a line magic
  assert.ok(!isProseMagic('\n%%generate\nhi'));
  assert.ok(!isProseMagic('%%sql\nselect 1'));
  assert.ok(!isProseMagic(''));
});

test('cell magic name and magic line range', () => {
  assert.equal(cellMagic('%%generate --n 2\nx'), 'generate');
  assert.equal(cellMagic('%%time\nx'), 'time');
  assert.equal(cellMagic('print(1)'), null);
  assert.deepEqual(magicLineRange('%%generate -n 2\nbody'), [0, 15]);
  assert.equal(magicLineRange('x = 1'), null);
  assert.ok(isProseMagic('%%time\nx', ['time']));
});

// The Markdown of %%generate cells (src/prose.ts), on the Markdown support JupyterLab gives.
const BATCH = '%%generate -n 2\nWhat is {x}?\n---\nAnd {y}?\n===\nLast one';

function blocks(support: ReturnType<typeof markdown>, text: string): string[] {
  const names: string[] = [];
  const top = support.language.parser.parse(text).topNode;
  for (let child = top.firstChild; child; child = child.nextSibling) {
    names.push(child.name);
  }
  return names;
}

test('JupyterLab\'s Markdown reads a batch of prompts as headings', () => {
  assert.deepEqual(blocks(markdown(), BATCH), ['SetextHeading2', 'SetextHeading1', 'Paragraph']);
});

test('in a %%generate cell, --- separates prompts and every prompt stays a paragraph', () => {
  const prompts = promptMarkdown(markdown());
  assert.deepEqual(blocks(prompts, BATCH), ['Paragraph', 'HorizontalRule', 'Paragraph']);
  assert.deepEqual(blocks(prompts, '%%generate\nA\n\n---\n\nB'), ['Paragraph', 'HorizontalRule', 'Paragraph']);
  assert.deepEqual(blocks(prompts, '%%generate\n# A title\n---\nB'), ['Paragraph', 'ATXHeading1', 'HorizontalRule',
    'Paragraph']);
  assert.deepEqual(blocks(prompts, '%%generate\nFix:\n```python\nx = 1\n```'), ['Paragraph', 'FencedCode']);
  assert.equal(prompts.language.name, 'markdown');
});

test('a language support that is not @lezer/markdown\'s is left as it is', () => {
  const other = { language: { parser: {} } } as unknown as ReturnType<typeof markdown>;
  assert.equal(promptMarkdown(other), other);
});
