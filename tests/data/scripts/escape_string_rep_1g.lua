-- sandbox escape: string_rep_1g
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local s = string.rep("x", 2^30)
  ctx:route("out", s)
end
