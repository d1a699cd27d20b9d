-- sandbox escape: infinite_loop
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  while true do end
end
