-- maskfill-lsp for Neovim 0.11+ (`:h lsp-config`): put editors/neovim on 'runtimepath' and call
-- vim.lsp.enable('maskfill-lsp'), or use require('maskfill').setup{}, which also sets up inline
-- completion and its keymaps. No `filetypes`: the server serves every language it is enabled for.
return {
  cmd = { 'maskfill-lsp', '--stdio' },
  root_markers = { '.git' },
  -- The server's state for require('maskfill').statusline(), with or without setup().
  handlers = {
    ['maskfill/didChangeStatus'] = function(...)
      return require('maskfill').on_server_status(...)
    end,
  },
}
