function on_message(msg, ctx)
  local x =
end
