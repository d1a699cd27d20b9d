-- sandbox escape: ctx_metatable
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  ctx.route = function() end
end
