-- sandbox escape: string_lib
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  -- breaking the shared string table only hurts this script
  string.upper = nil
  string.format = function() error("broken") end
  ctx:route("out", "broke string")
end
