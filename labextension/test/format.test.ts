import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { formatRate, formatStatus, formatTooltip, ILLMStatus, shortModel } from '../src/format';

const base: ILLMStatus = {
  loaded: true, default: 'native', backend: 'native', model: '/tmp/models/tiny-llama', running: 0, waiting: 0,
  tokens_per_s: 0, backends: 1, server_url: null
};

test('rates', () => {
  assert.equal(formatRate(0), '0.0 tok/s');
  assert.equal(formatRate(12.345), '12.3 tok/s');
  assert.equal(formatRate(0.4215), '0.42 tok/s');
  assert.equal(formatRate(2500), '2.5k tok/s');
  assert.equal(formatRate(-3), '0.0 tok/s');
  assert.equal(formatRate(Number.NaN), '0.0 tok/s');
});

test('model short names', () => {
  assert.equal(shortModel('/tmp/models/tiny-llama/'), 'tiny-llama');
  assert.equal(shortModel('HuggingFaceTB/SmolLM2-135M-Instruct'), 'SmolLM2-135M-Instruct');
  assert.equal(shortModel(null), '');
  assert.equal(shortModel('x'.repeat(40), 10), 'xxxxxxxxx…');
});

test('nothing shows without jupyter_llm', () => {
  assert.equal(formatStatus(null), '');
  assert.equal(formatStatus(undefined), '');
  assert.equal(formatStatus({ ...base, loaded: false }), '');
  assert.equal(formatTooltip(null), '');
});

test('idle, running, serving', () => {
  assert.equal(formatStatus({ ...base, backend: null, default: null, model: null, backends: 0 }), 'LLM: no backend');
  assert.equal(formatStatus(base), 'LLM: native · tiny-llama');
  assert.equal(formatStatus({ ...base, running: 2, tokens_per_s: 41.26 }), 'LLM: native · tiny-llama · 2 running · 41.3 tok/s');
  assert.equal(formatStatus({ ...base, tokens_per_s: 5 }), 'LLM: native · tiny-llama · 5.0 tok/s');
  assert.equal(
    formatStatus({ ...base, default: 'fast', server_url: 'http://127.0.0.1:8000/v1' }),
    'LLM: fast (native) · tiny-llama · http://127.0.0.1:8000/v1'
  );
  assert.equal(formatStatus({ ...base, running: 1, waiting: 3 }), 'LLM: native · tiny-llama · 1 running · 3 waiting · 0.0 tok/s');
  assert.match(formatTooltip({ ...base, server_url: 'http://127.0.0.1:1/v1' }), /server: http:\/\/127.0.0.1:1\/v1/);
});
