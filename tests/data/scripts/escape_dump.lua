-- sandbox escape: dump
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local code = string.dump(function() return 1 end)
  ctx:route("out", code)
end
