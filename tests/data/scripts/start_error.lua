function on_start()
  error("cannot start")
end
function on_message(msg, ctx) end
