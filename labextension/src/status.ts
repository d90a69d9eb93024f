/**
 * The link to jupyter_llm in one kernel (comm target "jupyter_llm", see jupyter_llm/labext.py),
 * and the status bar widget.
 */
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';
import { formatStatus, formatTooltip, ILLMStatus } from './format';

export const TARGET = 'jupyter_llm';
/** How long "Stop generation" waits for the comm's answer before interrupting a busy kernel. */
export const STOP_TIMEOUT_MS = 300;

type Reply = { type: string; id?: string; [key: string]: any };

export class KernelLink {
  constructor(readonly kernel: Kernel.IKernelConnection) {
    kernel.registerCommTarget(TARGET, (comm, msg) => this.attach(comm, msg.content.data as Reply, true));
    kernel.statusChanged.connect(this.onKernelStatus, this);
    void this.probe();
  }

  get status(): ILLMStatus | null {
    return this._status;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Whether jupyter_llm is loaded in this kernel (a comm is open). */
  get loaded(): boolean {
    return this._comm !== null;
  }

  /** A request over the comm; resolves with the reply, or null after `timeoutMs`. */
  request(action: string, timeoutMs = 5000): Promise<Reply | null> {
    const comm = this._comm;
    if (!comm || comm.isDisposed) {
      return Promise.resolve(null);
    }
    const id = `${action}-${++this._counter}`;
    return new Promise(resolve => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        resolve(null);
      }, timeoutMs);
      this._pending.set(id, reply => {
        clearTimeout(timer);
        resolve(reply);
      });
      try {
        comm.send({ action, id });
      } catch {
        clearTimeout(timer);
        this._pending.delete(id);
        resolve(null);
      }
    });
  }

  /**
   * Stop the kernel's running generation. Route: a comm message, which JupyterLab 4.4+ sends to a
   * kernel subshell (ipykernel 7), so it is handled while the cell runs; without subshells, or
   * when no answer comes within STOP_TIMEOUT_MS while the kernel is busy, interrupt the kernel.
   */
  async stop(): Promise<'comm' | 'interrupt' | 'none'> {
    const kernel = this.kernel;
    const busy = () => kernel.status === 'busy';
    if (this._comm && kernel.supportsSubshells) {
      const reply = await this.request('stop', STOP_TIMEOUT_MS);
      if (reply) {
        return 'comm';
      }
    }
    if (busy()) {
      await kernel.interrupt();
      return 'interrupt';
    }
    if (this._comm && !kernel.supportsSubshells) {
      await this.request('stop', STOP_TIMEOUT_MS);
      return 'comm';
    }
    return 'none';
  }

  dispose(): void {
    this.kernel.statusChanged.disconnect(this.onKernelStatus, this);
    this._comm = null;
    this.setStatus(null);
  }

  /** After a page reload: open a comm if the kernel already loaded jupyter_llm. */
  private async probe(): Promise<void> {
    try {
      await this.kernel.info;
      const reply = await this.kernel.requestCommInfo({ target_name: TARGET });
      const content = reply.content as KernelMessage.ICommInfoReplyMsg['content'];
      if (content.status !== 'ok' || this._comm || Object.keys(content.comms).length === 0) {
        return;
      }
      const comm = this.kernel.createComm(TARGET);
      this.attach(comm, null, false);
      comm.open({});
    } catch {
      // a kernel without comms or gone: nothing to show
    }
  }

  private attach(comm: Kernel.IComm, data: Reply | null, openedByKernel: boolean): void {
    this._comm = comm;
    comm.onMsg = msg => this.onMessage(msg.content.data as Reply);
    comm.onClose = () => {
      if (this._comm === comm) {
        this._comm = null;
        this.setStatus(null);
      }
    };
    if (data && data.type === 'status') {
      this.setStatus(data as unknown as ILLMStatus);
    }
    if (openedByKernel) {
      comm.send({ action: 'status' }); // subscribes this comm to pushed updates
    }
  }

  private onMessage(data: Reply): void {
    if (data.id && this._pending.has(data.id)) {
      const resolve = this._pending.get(data.id)!;
      this._pending.delete(data.id);
      resolve(data);
    }
    if (data.type === 'status') {
      this.setStatus(data as unknown as ILLMStatus);
    }
  }

  private onKernelStatus(_: Kernel.IKernelConnection, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._comm = null;
      this.setStatus(null);
    }
  }

  private setStatus(status: ILLMStatus | null): void {
    this._status = status;
    this._changed.emit();
  }

  private _comm: Kernel.IComm | null = null;
  private _status: ILLMStatus | null = null;
  private _changed = new Signal<this, void>(this);
  private _pending = new Map<string, (reply: Reply) => void>();
  private _counter = 0;
}

/** The status bar item: text for the notebook in focus; hidden when jupyter_llm is not loaded. */
export class StatusWidget extends Widget {
  constructor(onClick: () => void) {
    super();
    this.addClass('jllm-status-item');
    this.node.setAttribute('role', 'button');
    this.node.addEventListener('click', onClick);
  }

  render(status: ILLMStatus | null): void {
    const text = formatStatus(status);
    this.node.textContent = text;
    this.node.title = formatTooltip(status);
    this.node.dataset.running = String(!!status && status.running > 0);
  }
}

/** The %llm_backend table as a DOM table (text only: nothing from the kernel is parsed as HTML). */
export function tableNode(rows: Record<string, unknown>[]): HTMLElement {
  if (!rows.length) {
    const p = document.createElement('p');
    p.textContent = 'No backend loaded. Load one with %llm_backend hf (or native).';
    return p;
  }
  const table = document.createElement('table');
  table.className = 'jllm-table';
  const columns = Object.keys(rows[0]);
  const head = table.createTHead().insertRow();
  for (const column of columns) {
    const th = document.createElement('th');
    th.textContent = column;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const column of columns) {
      const value = row[column];
      tr.insertCell().textContent = typeof value === 'boolean' ? (value ? '✓' : '') : String(value ?? '');
    }
  }
  return table;
}
