-- sandbox escape: pcall_loop
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  while true do
    pcall(function() while true do end end)
  end
end
