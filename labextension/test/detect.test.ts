import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { cellMagic, firstLine, isProseMagic, magicLineRange } from '../src/detect';

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
