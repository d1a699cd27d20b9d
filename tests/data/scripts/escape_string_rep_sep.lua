-- sandbox escape: string_rep_sep
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local s = ("x"):rep(2^10, ("y"):rep(2^20))
  ctx:route("out", s)
end
