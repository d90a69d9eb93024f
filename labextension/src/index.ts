/**
 * jupyter-llm's JupyterLab extension:
 * - %%generate cells are edited as Markdown (highlight.ts);
 * - a status bar item for the notebook in focus, fed by the kernel's "jupyter_llm" comm (status.ts);
 * - the "Stop generation" command (palette, Accel Shift . in a notebook).
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, ICommandPalette, showDialog } from '@jupyterlab/apputils';
import { EditorExtensionRegistry, IEditorExtensionRegistry, IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';
import { proseMagicExtension, setProseLanguage } from './highlight';
import { KernelLink, StatusWidget, tableNode } from './status';

export const STOP_COMMAND = 'jupyter-llm:stop-generation';
export const TABLE_COMMAND = 'jupyter-llm:show-backends';

const highlightPlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-llm:highlight',
  description: 'Edit %%generate cells as Markdown instead of Python.',
  autoStart: true,
  requires: [IEditorExtensionRegistry, IEditorLanguageRegistry],
  activate: (_app: JupyterFrontEnd, extensions: IEditorExtensionRegistry, languages: IEditorLanguageRegistry) => {
    const extension = proseMagicExtension();
    extensions.addExtension({
      name: 'jupyter-llm:prose-magics',
      factory: () => EditorExtensionRegistry.createImmutableExtension(extension)
    });
    void languages
      .getLanguage('markdown')
      .then(language => {
        if (language?.support) {
          setProseLanguage(language.support);
        }
      })
      .catch(error => console.warn('jupyter-llm: no Markdown language for %%generate cells', error));
  }
};

const statusPlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-llm:status',
  description: 'Status of jupyter_llm in the kernel, and the Stop generation command.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker, statusBar: IStatusBar | null,
    palette: ICommandPalette | null) => {
    const links = new WeakMap<Kernel.IKernelConnection, KernelLink>();
    const activeChanged = new Signal<any, void>({});
    let shown: KernelLink | null = null;

    const linkOf = (kernel: Kernel.IKernelConnection | null | undefined): KernelLink | null => {
      if (!kernel || kernel.isDisposed) {
        return null;
      }
      let link = links.get(kernel);
      if (!link) {
        link = new KernelLink(kernel);
        links.set(kernel, link);
        link.changed.connect(refresh);
        kernel.disposed.connect(() => link!.dispose());
      }
      return link;
    };
    const currentLink = (): KernelLink | null => linkOf(tracker.currentWidget?.sessionContext.session?.kernel);

    const showTable = async (): Promise<void> => {
      const link = currentLink();
      const reply = link ? await link.request('table') : null;
      const body = new Widget({
        node: reply ? tableNode(reply.rows ?? []) : document.createElement('div')
      });
      if (!reply) {
        body.node.textContent = 'jupyter_llm is not loaded in this kernel (%load_ext jupyter_llm).';
      }
      body.addClass('jllm-backends-dialog');
      await showDialog({ title: 'jupyter_llm: loaded backends', body, buttons: [Dialog.okButton()] });
    };

    const widget = new StatusWidget(() => void app.commands.execute(TABLE_COMMAND));
    widget.id = 'jupyter-llm-status';
    function refresh(): void {
      shown = currentLink();
      widget.render(shown?.status ?? null);
      activeChanged.emit();
    }

    const follow = (panel: NotebookPanel): void => {
      panel.sessionContext.kernelChanged.connect(() => {
        linkOf(panel.sessionContext.session?.kernel);
        refresh();
      });
      void panel.sessionContext.ready.then(() => {
        linkOf(panel.sessionContext.session?.kernel);
        refresh();
      });
    };
    tracker.forEach(follow);
    tracker.widgetAdded.connect((_, panel) => follow(panel));
    tracker.currentChanged.connect(refresh);

    if (statusBar) {
      statusBar.registerStatusItem('jupyter-llm:status', {
        item: widget,
        align: 'left',
        rank: 4,
        isActive: () => !!shown?.status,
        activeStateChanged: activeChanged
      });
    }

    app.commands.addCommand(STOP_COMMAND, {
      label: 'Stop generation',
      caption: 'Cancel the LLM generation running in this notebook\'s kernel (jupyter_llm), keeping its output so far',
      isEnabled: () => !!tracker.currentWidget?.sessionContext.session?.kernel,
      execute: async () => {
        const link = currentLink();
        return link ? link.stop() : 'none';
      }
    });
    app.commands.addCommand(TABLE_COMMAND, {
      label: 'Show loaded LLM backends',
      caption: 'The %llm_backend table of this notebook\'s kernel',
      isEnabled: () => !!currentLink()?.loaded,
      execute: showTable
    });
    app.commands.addKeyBinding({ command: STOP_COMMAND, keys: ['Accel Shift .'], selector: '.jp-Notebook' });
    if (palette) {
      palette.addItem({ command: STOP_COMMAND, category: 'jupyter-llm' });
      palette.addItem({ command: TABLE_COMMAND, category: 'jupyter-llm' });
    }
    refresh();
  }
};

export default [highlightPlugin, statusPlugin];
