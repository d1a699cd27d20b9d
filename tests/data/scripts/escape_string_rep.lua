-- sandbox escape: string_rep
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local s = string.rep("x", 2^31)
  ctx:route("out", s)
end
