/**
 * The Markdown of %%generate cells: JupyterLab's Markdown without setext headings, so that a
 * batch separator `---` right under a prompt reads as a separator (a thematic break), not as the
 * underline that makes the prompt above it a heading. ATX headings (`# Title`) stay.
 * No JupyterLab import: unit-tested with node's test runner.
 */
import { Language, LanguageSupport } from '@codemirror/language';

/** The @lezer/markdown configuration of prompts. */
export const PROMPT_MARKDOWN = { remove: ['SetextHeading'] };

interface IConfigurable {
  configure(config: typeof PROMPT_MARKDOWN): Language['parser'];
}

/** `support` (a Markdown language support) with its parser configured for prompts; unchanged
 * when its parser is not @lezer/markdown's. */
export function promptMarkdown(support: LanguageSupport): LanguageSupport {
  const { language } = support;
  const parser = language.parser as unknown as Partial<IConfigurable>;
  if (typeof parser.configure !== 'function') {
    return support;
  }
  const prompts = new Language(language.data, parser.configure(PROMPT_MARKDOWN), [], language.name);
  return new LanguageSupport(prompts, support.support);
}
