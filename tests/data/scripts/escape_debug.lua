-- sandbox escape: debug
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local reg = debug.getregistry()
  ctx:route("out", tostring(reg))
end
