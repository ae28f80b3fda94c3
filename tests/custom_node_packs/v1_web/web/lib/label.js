export function greetingLabel(name) {
  return `seen: ${name}`;
}
