/**
 * Status formatting for the status bar item. Pure: unit-tested with node's test runner.
 */

/** What the kernel's comm pushes (jupyter_llm/labext.py: status()). */
export interface ILLMStatus {
  type?: 'status';
  loaded: boolean;
  default: string | null;
  backend: string | null;
  model: string | null;
  running: number;
  waiting: number;
  tokens_per_s: number;
  backends: number;
  server_url: string | null;
}

/** "12.3 tok/s", "0.42 tok/s", "1.2k tok/s". */
export function formatRate(tokensPerSecond: number): string {
  const r = Number.isFinite(tokensPerSecond) ? Math.max(0, tokensPerSecond) : 0;
  if (r >= 1000) {
    return `${(r / 1000).toFixed(1)}k tok/s`;
  }
  if (r > 0 && r < 1) {
    return `${r.toFixed(2)} tok/s`;
  }
  return `${r.toFixed(1)} tok/s`;
}

/** The model's short name: the last path component, at most `max` characters. */
export function shortModel(model: string | null, max = 32): string {
  if (!model) {
    return '';
  }
  const parts = model.replace(/[\\/]+$/, '').split(/[\\/]/);
  const name = parts[parts.length - 1] || model;
  return name.length > max ? `${name.slice(0, max - 1)}…` : name;
}

/** The status bar text; empty when nothing should show (jupyter_llm not loaded). */
export function formatStatus(status: ILLMStatus | null | undefined): string {
  if (!status || !status.loaded) {
    return '';
  }
  const parts: string[] = [];
  if (status.backend) {
    const name = status.default && status.default !== status.backend ? `${status.default} (${status.backend})` : status.backend;
    parts.push(`LLM: ${name}`);
    const model = shortModel(status.model);
    if (model) {
      parts.push(model);
    }
  } else {
    parts.push('LLM: no backend');
  }
  if (status.running > 0) {
    parts.push(`${status.running} running`);
  }
  if (status.waiting > 0) {
    parts.push(`${status.waiting} waiting`);
  }
  if (status.running > 0 || status.tokens_per_s > 0) {
    parts.push(formatRate(status.tokens_per_s));
  }
  if (status.server_url) {
    parts.push(status.server_url);
  }
  return parts.join(' · ');
}

/** The tooltip: every field on its own line. */
export function formatTooltip(status: ILLMStatus | null | undefined): string {
  if (!status || !status.loaded) {
    return '';
  }
  return [
    'jupyter_llm is loaded in this kernel',
    `default backend: ${status.default ?? 'none'}${status.backend ? ` (${status.backend})` : ''}`,
    `model: ${status.model ?? '-'}`,
    `backends loaded: ${status.backends}`,
    `requests running: ${status.running}, waiting: ${status.waiting}`,
    `recent throughput: ${formatRate(status.tokens_per_s)}`,
    `server: ${status.server_url ?? 'not running (%llm_serve starts one)'}`,
    'Click for the %llm_backend table'
  ].join('\n');
}
